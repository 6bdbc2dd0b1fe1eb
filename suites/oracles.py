"""Test oracles: other ways of computing what the package computes, kept out of the package.

:func:`hf_generate` decodes with transformers' own ``generate`` and the harness's per-row seeded sampler (as a
logits processor), a per-row ``max_new_tokens`` (as a stopping criterion) and transformers' ``min_new_tokens``:
the tokens :func:`harness.ppo.rollout.generate` (the package's decode loop) must draw for the same seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from harness.models import encode
from harness.ppo.batch import pad_right
from harness.ppo.rollout import Rollout, SeededSampler, cut_after_eos


class SeededProcessor(LogitsProcessor):
    """The harness's :class:`SeededSampler` as a ``generate`` logits processor: with greedy decoding,
    ``argmax(logits / T + Gumbel)`` is its sample. New token t is read from the decoder ids (``prefix``: the
    decoder start token)."""

    def __init__(self, sampler: SeededSampler, prefix: int = 1):
        self.sampler, self.prefix = sampler, prefix

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.sampler.perturb(scores, input_ids.shape[1] - self.prefix)


class PerRowMaxNewTokens(StoppingCriteria):
    """Marks row i finished once it has ``limits[i]`` new tokens (decoder ids include the start token)."""

    def __init__(self, limits: Sequence[int], prefix: int = 1):
        self.limits = torch.tensor(list(limits))
        self.prefix = prefix

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.limits.device != input_ids.device:
            self.limits = self.limits.to(input_ids.device)
        return input_ids.shape[1] - self.prefix >= self.limits


@torch.inference_mode()
def hf_generate(model, tokenizer, input_ids: Sequence[Sequence[int]], *, max_new_tokens: Sequence[int] | int,
                seeds: Sequence[int], min_new_tokens: int = 0, top_k: int = 0, top_p: float = 1.0,
                temperature: float = 1.0, do_sample: bool = True, device=None) -> Rollout:
    """transformers' ``generate`` with the harness's sampler, as a :class:`Rollout` (responses cut as the
    package cuts them). The keywords are the package's ``generate``'s (top-k and top-p off only)."""
    assert top_k == 0 and top_p == 1.0, "the harness samples without top-k / top-p filtering"
    n = len(input_ids)
    limits = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(x) for x in max_new_tokens]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    enc_ids, enc_mask = pad_right([torch.as_tensor(list(x), dtype=torch.long) for x in input_ids], pad)
    device = device or next(model.parameters()).device
    enc_ids, enc_mask = enc_ids.to(device), enc_mask.to(device)
    was_training = model.training
    model.eval()
    processors = [SeededProcessor(SeededSampler(seeds, temperature=temperature))] if do_sample else []
    kwargs = dict(max_new_tokens=max(limits), do_sample=False, num_beams=1, top_k=None, top_p=None,
                  temperature=None, pad_token_id=pad, eos_token_id=eos,
                  logits_processor=LogitsProcessorList(processors),
                  stopping_criteria=StoppingCriteriaList([PerRowMaxNewTokens(limits)]))
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    try:
        out = model.generate(input_ids=enc_ids, attention_mask=enc_mask,
                             encoder_outputs=encode(model, enc_ids, enc_mask), **kwargs)
    finally:
        if was_training:
            model.train()
    out = out[:, 1:].cpu().clone()  # the decoder start token is not an action
    responses = [cut_after_eos(row, eos, pad, limit) for row, limit in zip(out, limits)]
    texts = tokenizer.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
    return Rollout(responses=responses, texts=texts, lengths=[int(r.numel()) for r in responses])
