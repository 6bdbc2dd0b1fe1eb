"""A batch of (query, response) rows as the models read it, and the rollout's record of the policy on it.

Shared by the rollout (:mod:`harness.ppo.rollout`), the PPO step (:mod:`harness.ppo.step`) and the evaluation's
KL (:mod:`harness.evaluation`), which all sit above this module:

- :func:`pad_right`, :func:`prepare_inputs`: encoder inputs right-padded (T5's relative positions need it),
  decoder inputs ``[start] + response``;
- :func:`response_mask`, :func:`predicting`: which decoder positions are actions, and the forward pass that
  reads them;
- :class:`Record` (what to record while sampling) and :class:`Recorded` (what was recorded): each action's
  log-prob and the value head's value, taken by the rollout as it samples, so that the PPO step need not
  run the policy's forward pass again.

Responses are *actions only*: the decoder start token is not part of them; :func:`prepare_inputs` prepends it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .core import SampledDistribution

# ------------------------------------------------------------------------------------ inputs


def pad_right(seqs: Sequence[torch.Tensor], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D tensors to one (B, T) tensor and its attention mask."""
    longest = max(int(s.numel()) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : s.numel()] = s
        mask[i, : s.numel()] = 1
    return ids, mask


def prepare_inputs(queries, responses, pad_token_id: int, decoder_start_token_id: int, device) -> dict:
    """Encoder inputs (right padding: T5's relative positions need it) and decoder inputs [start] + response."""
    input_ids, attention_mask = pad_right([q.reshape(-1).long().cpu() for q in queries], pad_token_id)
    start = torch.tensor([decoder_start_token_id], dtype=torch.long)
    decoder_input_ids, decoder_attention_mask = pad_right(
        [torch.cat([start, r.reshape(-1).long().cpu()]) for r in responses], pad_token_id)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "decoder_input_ids": decoder_input_ids.to(device),
            "decoder_attention_mask": decoder_attention_mask.to(device)}


def response_mask(decoder_attention_mask: torch.Tensor, *, mask_first_action: bool = False) -> torch.Tensor:
    """(B, T-1) mask of the actions: position t is the log-prob of decoder token t+1.

    The harness counts every generated token as an action; ``mask_first_action`` (``TRLQuirks``) drops the
    first one, as TRL 0.11.4 does.
    """
    mask = decoder_attention_mask[:, 1:].clone()
    if mask_first_action:
        mask[:, 0] = 0
    return mask


def predicting(inputs: dict) -> tuple[dict, torch.Tensor]:
    """The inputs of a forward pass whose outputs are read for the actions, and the actions (the labels).

    Decoder position t predicts token t + 1, so the last decoder token's prediction is never read: it is
    left out of the forward (a position less, and no slice of the (B, T, V) logits, whose backward pass
    would write a zero tensor of their size). The decoder is causal: the other positions are unchanged.
    """
    ids, mask = inputs["decoder_input_ids"], inputs["decoder_attention_mask"]
    if ids.shape[1] < 2:
        raise ValueError("ppo_step: every response is empty (no action to score)")
    return dict(inputs, decoder_input_ids=ids[:, :-1], decoder_attention_mask=mask[:, :-1]), ids[:, 1:]


# ------------------------------------------------------------------------------------ the rollout's record

@dataclass(frozen=True)
class Record:
    """What :func:`harness.ppo.rollout.generate` records while it samples (its ``record=``): each action's
    log-prob under ``distribution`` and ``value_head(last decoder hidden state)``."""

    value_head: Callable[[torch.Tensor], torch.Tensor]
    distribution: SampledDistribution = SampledDistribution()


@dataclass
class Recorded:
    """The policy's outputs on its own rollout, recorded while it sampled (``Rollout.recorded``, with
    ``generate(record=...)``): per response, each action's log-prob under ``distribution`` and the value
    head's value.

    The policy has not changed since it sampled, so these are what the PPO step's phase (a) would compute
    again by a forward pass (equal up to float rounding: the decode loop runs one position at a time): with
    them :func:`harness.ppo.step.ppo_step` runs only the reference's forward.
    """

    logprobs: list[torch.Tensor]  # one (len(response),) tensor per response
    values: list[torch.Tensor]
    distribution: SampledDistribution

    def padded(self, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, width) log-probs and values, zero past each response (masked there)."""
        out = []
        for rows in (self.logprobs, self.values):
            t = torch.zeros((len(rows), width), dtype=torch.float32)
            for i, r in enumerate(rows):
                t[i, :r.numel()] = r.float()
            out.append(t.to(device))
        return out[0], out[1]
