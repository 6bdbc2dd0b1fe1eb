"""Batched generation for rollouts and evaluation.

- The whole batch is generated in one ``generate`` call (the reference looped one prompt at a time).
- Each row has its own seed: sampling is done by the Gumbel-max trick with a per-row generator
  (:class:`SeededSampler`), so a prompt's sample depends on its seed only, not on the batch it is in.
  Before/after evaluations thus sample with the same seeds per prompt (a paired comparison), and a
  resumed run draws what the uninterrupted run drew.
- Each row has its own ``max_new_tokens`` (from a :class:`LengthSampler`), honoured inside the batched
  call by a per-row stopping criterion.
- The encoder keeps the tokenizer's right padding (left padding breaks T5's relative position bias).
- The decoder start token is not an action: responses exclude it, and are cut after their first EOS.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from .step import pad_right


class LengthSampler:
    """Draws max_new_tokens uniformly from [low, high), like TRL's LengthSampler."""

    def __init__(self, low: int, high: int, seed: int = 0):
        if high <= low:
            raise ValueError(f"LengthSampler: high ({high}) must be > low ({low})")
        self.values = list(range(low, high))
        self.rng = random.Random(seed)

    def __call__(self) -> int:
        return self.rng.choice(self.values)

    def sample(self, n: int) -> list[int]:
        return [self() for _ in range(n)]


class SeededSampler(LogitsProcessor):
    """Temperature, top-k, top-p, then Gumbel noise from a per-row generator.

    Used with greedy decoding, ``argmax(logits / T + Gumbel)`` is an exact sample of the filtered
    softmax, and each row's noise comes from its own seed.
    """

    def __init__(self, seeds: Sequence[int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, sorted_idx = torch.sort(scores, descending=True, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            remove = cum - sorted_logits.softmax(-1) > self.top_p  # keep the token that crosses top_p
            remove = remove.scatter(-1, sorted_idx, remove)
            scores = scores.masked_fill(remove, float("-inf"))
        u = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators]).to(scores.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        return scores + gumbel


class PerRowMaxNewTokens(StoppingCriteria):
    """Marks row i finished once it has ``limits[i]`` new tokens (decoder ids include the start token)."""

    def __init__(self, limits: Sequence[int], prefix: int = 1):
        self.limits = torch.tensor(list(limits))
        self.prefix = prefix

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prefix
        return (generated >= self.limits.to(input_ids.device))


@dataclass
class Rollout:
    responses: list[torch.Tensor]  # actions only: no decoder start token, cut after the first EOS
    texts: list[str]
    lengths: list[int]


def cut_after_eos(ids: torch.Tensor, eos_token_id: int, pad_token_id: int, limit: int | None = None) -> torch.Tensor:
    """A row of generated ids (decoder start token already removed) as the actions taken.

    Cut after the first EOS. Without an EOS, a row cut at its own ``limit`` is kept whole: every id in
    it was sampled, a pad id included (T5's pad is a token the policy can sample with top_k=0). Only
    when no limit is known are trailing pads taken for batch padding and dropped.
    """
    ids = ids.reshape(-1)
    if limit is not None:
        ids = ids[:limit]
    hits = (ids == eos_token_id).nonzero()
    if hits.numel():
        return ids[: int(hits[0, 0]) + 1]
    if limit is not None:
        return ids
    keep = ids.numel()
    while keep > 0 and int(ids[keep - 1]) == pad_token_id:
        keep -= 1
    return ids[:keep]


@torch.no_grad()
def generate(model, tokenizer, input_ids: Sequence[Sequence[int]], *, max_new_tokens: Sequence[int] | int,
             seeds: Sequence[int], min_new_tokens: int = 0, top_k: int = 0, top_p: float = 1.0,
             temperature: float = 1.0, do_sample: bool = True, device=None) -> Rollout:
    """One batched ``generate`` call for all prompts; each row with its own seed and length limit.

    The sampling keywords are those of :meth:`harness.config.SamplingConfig.sampling_kwargs`, so a caller
    passes ``**cfg.rollout.sampling_kwargs()`` or ``**cfg.eval.sampling_kwargs()``. ``min_new_tokens``: EOS
    is banned until a row has that many new tokens (transformers' ``min_new_tokens``; its ``min_length``
    would count T5's decoder start token too).
    """
    n = len(input_ids)
    limits = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(x) for x in max_new_tokens]
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    enc_ids, enc_mask = pad_right([torch.as_tensor(list(x), dtype=torch.long) for x in input_ids], pad)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()  # sample with dropout off (TRL 0.11.4 left train mode on here: negative KL)
    processors = LogitsProcessorList()
    if do_sample:
        processors.append(SeededSampler(seeds, temperature=temperature, top_k=top_k, top_p=top_p))
    kwargs = dict(max_new_tokens=max(limits), do_sample=False, num_beams=1, top_k=None, top_p=None,
                  temperature=None, pad_token_id=pad, eos_token_id=eos, logits_processor=processors,
                  stopping_criteria=StoppingCriteriaList([PerRowMaxNewTokens(limits)]))
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    with torch.inference_mode():  # no autograd bookkeeping at all while sampling (faster than no_grad alone)
        out = model.generate(input_ids=enc_ids.to(device), attention_mask=enc_mask.to(device), **kwargs)
    if was_training:
        model.train()
    # drop the decoder start token (it is not an action); clone outside inference mode, so that the
    # responses are ordinary tensors that a later training forward may use
    out = out[:, 1:].cpu().clone()
    responses = [cut_after_eos(row, eos, pad, limit) for row, limit in zip(out, limits)]
    texts = tokenizer.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
    return Rollout(responses=responses, texts=texts, lengths=[int(r.numel()) for r in responses])
