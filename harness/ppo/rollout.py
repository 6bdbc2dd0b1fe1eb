"""Batched generation for rollouts and evaluation.

- The whole batch is decoded together (the reference looped one prompt at a time), by a compact loop over
  the model's forward with a KV cache (:func:`decode`); the tests check it against transformers' ``generate``
  with the same sampler (the same tokens for the same seeds).
- Each row has its own seed: sampling is the Gumbel-max trick with counter-based noise computed on the
  device for the whole batch at once (:mod:`harness.ppo.sampling`): the noise of (row seed, position, token
  id) comes from integer tensor ops, so a prompt's sample depends on its seed only, not on the batch it is
  in. Before/after evaluations thus sample with the same seeds per prompt (a paired comparison), and a
  resumed run draws what the uninterrupted run drew.
- Each row has its own ``max_new_tokens`` (from a :class:`LengthSampler`), honoured inside the batch.
- The encoder keeps the tokenizer's right padding (left padding breaks T5's relative position bias).
- The decoder start token is not an action: responses exclude it, and are cut after their first EOS.
- With ``record=`` the loop also records what the PPO step would otherwise recompute by a forward pass of
  the policy: each action's log-prob under the sampled distribution and the value head's value
  (:class:`harness.ppo.batch.Recorded`).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache

from ..models import encode
from .batch import Record, Recorded, pad_right
from .sampling import RowSampler


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


class SeededSampler:
    """Temperature, then each row's counter-based Gumbel noise: ``argmax`` of :meth:`perturb` is an exact
    sample of the tempered softmax. The noise of row i at new token t is that of ``(seeds[i], t, token id)``.
    The :class:`RowSampler` is made on the first call, for the logits' vocabulary and device.
    """

    def __init__(self, seeds: Sequence[int], temperature: float = 1.0):
        self.seeds = [int(s) for s in seeds]
        self.temperature = temperature
        self._sampler: RowSampler | None = None

    def sampler(self, vocab_size: int, device) -> RowSampler:
        s = self._sampler
        if s is None or s.noise.vocab_size != vocab_size or s.noise.device != torch.device(device):
            s = self._sampler = RowSampler(self.seeds, vocab_size, device, self.temperature)
        return s

    def perturb(self, scores: torch.Tensor, position: int) -> torch.Tensor:
        """(B, V) logits at new token ``position``, tempered, plus the rows' noise there."""
        return self.sampler(scores.shape[-1], scores.device).perturb(scores, position)


@dataclass
class Rollout:
    responses: list[torch.Tensor]  # actions only: no decoder start token, cut after the first EOS
    texts: list[str]
    lengths: list[int]
    recorded: Recorded | None = None  # with generate(record=...): the policy's log-probs and values


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
             temperature: float = 1.0, do_sample: bool = True, device=None, record: Record | None = None) -> Rollout:
    """All prompts decoded together by :func:`decode`; each row with its own seed and length limit.

    The sampling keywords are those of :meth:`harness.config.SamplingConfig.sampling_kwargs`, so a caller
    passes ``**cfg.rollout.sampling_kwargs()`` or ``**cfg.eval.sampling_kwargs()``. ``min_new_tokens``: EOS
    is banned until a row has that many new tokens (transformers' ``min_new_tokens``; its ``min_length``
    would count T5's decoder start token too). ``top_k`` and ``top_p`` are accepted at their defaults only
    (off): the config refuses any other value, since PPO's log-probs would be of another distribution.
    ``record``: also record each action's log-prob and value (``Rollout.recorded``).
    """
    if top_k != 0 or top_p != 1.0:
        raise ValueError(f"generate: top_k={top_k!r}, top_p={top_p!r}: filtering is not supported (0 and 1.0 only)")
    n = len(input_ids)
    limits = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(x) for x in max_new_tokens]
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    enc_ids, enc_mask = pad_right([torch.as_tensor(list(x), dtype=torch.long) for x in input_ids], pad)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()  # sample with dropout off (TRL 0.11.4 left train mode on here: negative KL)
    sampler = SeededSampler(seeds, temperature=temperature) if do_sample else None
    try:
        with torch.inference_mode():  # no autograd bookkeeping at all while sampling (faster than no_grad alone)
            out, outputs = decode(model, enc_ids.to(device), enc_mask.to(device), limits=limits, sampler=sampler,
                                  min_new_tokens=min_new_tokens, pad_token_id=pad, eos_token_id=eos, record=record)
    finally:
        if was_training:
            model.train()
    # clone outside inference mode, so that the responses are ordinary tensors a later training forward may use
    out = out.cpu().clone()
    responses = [cut_after_eos(row, eos, pad, limit) for row, limit in zip(out, limits)]
    texts = tokenizer.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
    recorded = None
    if outputs is not None:
        logprobs, values = (x.cpu().clone() for x in outputs)
        recorded = Recorded(logprobs=[lp[:len(r)] for lp, r in zip(logprobs, responses)],
                            values=[v[:len(r)] for v, r in zip(values, responses)], distribution=record.distribution)
    return Rollout(responses=responses, texts=texts, lengths=[int(r.numel()) for r in responses], recorded=recorded)


# ------------------------------------------------------------------------------------ the decode loop

class _PreallocatedLayer(DynamicLayer):
    """A self-attention cache layer that writes into one buffer of ``capacity`` positions and hands out views
    of its filled part: no concatenation per token (a dynamic layer copies its whole cache at every token),
    and attention reads only the filled positions (a static cache reads, masked, all of them)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.filled = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.device = key_states.device
            b, h, _, d = key_states.shape
            self._k = key_states.new_empty((b, h, self.capacity, d))
            self._v = value_states.new_empty((b, h, self.capacity, d))
            self.is_initialized = True
        n, q = self.filled, key_states.shape[-2]
        if n + q > self.capacity:
            raise RuntimeError(f"decode: the cache holds {self.capacity} positions, {n + q} asked for")
        self._k[:, :, n:n + q].copy_(key_states)
        self._v[:, :, n:n + q].copy_(value_states)
        self.filled = n + q
        self.keys, self.values = self._k[:, :, :n + q], self._v[:, :, :n + q]
        return self.keys, self.values


def _make_cache(capacity: int) -> EncoderDecoderCache:
    self_attention = DynamicCache()
    self_attention.layer_class_to_replicate = lambda: _PreallocatedLayer(capacity)
    return EncoderDecoderCache(self_attention, DynamicCache())


def _cache_keyword(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.inference_mode()
def decode(model, enc_ids: torch.Tensor, enc_mask: torch.Tensor, *, limits: Sequence[int],
           sampler: SeededSampler | None, min_new_tokens: int, pad_token_id: int, eos_token_id: int,
           record: Record | None = None):
    """The compact decode loop: the encoder once, then one decoder forward per token over a preallocated cache.

    Per token: EOS banned before ``min_new_tokens``, the rows' seeded sample (or the argmax without a
    sampler), pad once a row has ended (EOS or its limit); it stops when every row has. Returns the
    (B, max(limits)) new tokens and, with ``record``, the (B, max(limits)) log-probs of each token under
    ``record.distribution`` and the values (else None). Tokens equal transformers' ``generate``'s with the
    same sampler (suites/unit/test_sampling.py).
    """
    config = model.config
    start = config.decoder_start_token_id
    batch, longest = enc_ids.shape[0], max(limits)
    device = enc_ids.device
    encoder_outputs = encode(model, enc_ids, enc_mask)
    cache = _make_cache(longest)
    cache_kw = _cache_keyword(model)
    tokens = torch.full((batch, longest), pad_token_id, dtype=torch.long, device=device)
    limits_t = torch.tensor(list(limits), device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    current = torch.full((batch, 1), start, dtype=torch.long, device=device)
    logprobs = values = None
    if record is not None:
        logprobs = torch.zeros((batch, longest), dtype=torch.float32, device=device)
        values = torch.zeros((batch, longest), dtype=torch.float32, device=device)
    check_every = 1 if device.type == "cpu" else 8  # a host sync per check
    for t in range(longest):
        out = model(encoder_outputs=encoder_outputs, attention_mask=enc_mask, decoder_input_ids=current,
                    use_cache=True, output_hidden_states=record is not None, return_dict=True, **{cache_kw: cache})
        logits = out.logits[:, -1, :].float()
        scores = logits.clone() if t < min_new_tokens else logits
        if t < min_new_tokens:
            scores[:, eos_token_id] = float("-inf")
        if sampler is not None:
            scores = sampler.perturb(scores, t)
        nxt = scores.argmax(-1)
        if record is not None:
            logprobs[:, t] = record.distribution.logprobs_at(logits, nxt, t)
            values[:, t] = record.value_head(out.decoder_hidden_states[-1][:, -1]).float()
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
        tokens[:, t] = nxt
        unfinished &= (nxt != eos_token_id) & (limits_t > t + 1)
        current = nxt[:, None]
        if (t + 1) % check_every == 0 and not bool(unfinished.any()):
            break
    return tokens, ((logprobs, values) if record is not None else None)
