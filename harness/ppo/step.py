"""One PPO update of a seq2seq policy on (query, response, score) triples.

The algorithm and the statistic names are TRL 0.11.4's ``PPOTrainer.step`` for encoder-decoder
models; ``docs/ppo.md`` lists where the harness deliberately differs (each difference has a
``trl_compat`` switch so that ``suites/unit/test_parity.py`` can compare number for number).

Responses are *actions only*: the decoder start token is not part of them; this module prepends it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence

import torch

from ..config import PPOConfig
from . import core


def make_optimizer(policy, config: PPOConfig) -> torch.optim.Optimizer:
    """Adam over the trainable parameters (LoRA + value head), as TRL's default."""
    return torch.optim.Adam(policy.trainable_parameters(), lr=config.learning_rate)


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


def response_mask(decoder_attention_mask: torch.Tensor, trl_compat: bool = False) -> torch.Tensor:
    """(B, T-1) mask of the actions: position t is the log-prob of decoder token t+1.

    The harness counts every generated token as an action. TRL 0.11.4 (``start = 1`` in
    ``batched_forward_pass``) also masks out the first generated token; ``trl_compat`` copies that.
    """
    mask = decoder_attention_mask[:, 1:].clone()
    if trl_compat:
        mask[:, 0] = 0
    return mask


def forward_pass(policy, inputs: dict, mask_compat: bool, chunk: int, return_logits: bool, reference: bool = False):
    """Log-probs of the actions, values, masks (and optionally logits), in chunks of ``chunk`` rows."""
    all_logprobs, all_values, all_logits = [], [], []
    n = inputs["input_ids"].shape[0]
    for i in range(math.ceil(n / chunk)):
        part = {k: v[i * chunk:(i + 1) * chunk] for k, v in inputs.items()}
        if reference:
            logits = policy.reference_logits(**part)
            values = None
        else:
            logits, values = policy(**part)
        dec = part["decoder_input_ids"]
        all_logprobs.append(core.logprobs_from_logits(logits[:, :-1, :], dec[:, 1:]))
        if values is not None:
            all_values.append(values[:, :-1])
        if return_logits:
            all_logits.append(logits[:, :-1, :])
    masks = response_mask(inputs["decoder_attention_mask"], mask_compat)
    return (torch.cat(all_logprobs), torch.cat(all_values) if all_values else None, masks,
            torch.cat(all_logits) if return_logits else None)


def _snapshot(policy, optimizer):
    params = [p.detach().clone() for p in policy.trainable_parameters()]
    return params, copy.deepcopy(optimizer.state_dict())


def _restore(policy, optimizer, snap) -> None:
    params, opt_state = snap
    with torch.no_grad():
        for p, saved in zip(policy.trainable_parameters(), params):
            p.copy_(saved)
    optimizer.load_state_dict(opt_state)
    optimizer.zero_grad(set_to_none=True)


def _stack_mean(dicts: list[dict]) -> dict:
    return {k: float(torch.stack([torch.as_tensor(d[k], dtype=torch.float64) for d in dicts]).mean()) for k in dicts[0]}


def ppo_step(policy, optimizer, kl_ctl, queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor],
             scores: torch.Tensor, config: PPOConfig, *, pad_token_id: int, decoder_start_token_id: int,
             permutations: Iterator[Sequence[int]] | None = None, generator: torch.Generator | None = None,
             running=None, raw_scores: torch.Tensor | None = None) -> dict[str, float]:
    """Run one PPO step and return its statistics (TRL 0.11 names) as floats.

    ``scores`` are the rewards per response (already transformed). ``permutations`` yields one index
    order per epoch (for replaying another implementation's order); otherwise ``generator`` draws them.
    A non-finite score, loss (e.g. from a NaN logit or value), gradient or updated weight skips the whole
    update: every trainable weight, the optimizer state and the running score moments are restored to
    what they were before the step, and the statistics carry ``skipped = 1`` and ``skip_reason``.
    """
    t0 = time.time()
    bs = len(queries)
    if bs != len(responses) or bs != len(scores):
        raise ValueError(f"ppo_step: {bs} queries, {len(responses)} responses and {len(scores)} scores must match")
    device = policy.device
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1).to(device)
    raw = scores if raw_scores is None else torch.as_tensor(raw_scores, dtype=torch.float32).reshape(-1)
    stats: dict[str, float] = {}
    if not torch.isfinite(scores).all():
        return _skipped_stats(kl_ctl, raw, queries, responses, reason="non-finite score", t0=t0)
    running_before = running.state_dict() if running is not None else None
    scores = core.transform_scores(scores, running, config_flag(config, "score_scaling"),
                                   config_flag(config, "score_norm"), getattr(config, "score_clip", None))

    policy.eval()  # dropout off for rollout scoring and training alike (see docs/ppo.md)
    inputs = prepare_inputs(queries, responses, pad_token_id, decoder_start_token_id, device)
    full_kl = config.kl_penalty == "full"
    fbs = config.mini_batch_size
    t = time.time()
    with torch.no_grad():
        logprobs, values, masks, logits = forward_pass(policy, inputs, config.trl_compat, fbs, full_kl)
        ref_logprobs, _, _, ref_logits = forward_pass(policy, inputs, config.trl_compat, fbs, full_kl, reference=True)
    stats["time/ppo/forward_pass"] = time.time() - t
    masks = masks.to(logprobs.dtype)

    t = time.time()
    with torch.no_grad():
        if full_kl:
            kls = core.kl_penalty(core.logprobs_from_logits(logits, None, gather=False),
                                  core.logprobs_from_logits(ref_logits, None, gather=False), "full")
        else:
            kls = core.kl_penalty(logprobs, ref_logprobs, config.kl_penalty)
        del logits, ref_logits
        rewards, non_score = core.compute_rewards(scores, kls, masks, kl_ctl.value)
        stats["time/ppo/compute_rewards"] = time.time() - t
        t = time.time()
        values, advantages, returns = core.compute_gae(values, rewards, masks, config.gamma, config.lam,
                                                       config.whiten_rewards, mask_whitened=not config.trl_compat)
        stats["time/ppo/compute_advantages"] = time.time() - t

    snap = _snapshot(policy, optimizer)
    t = time.time()
    mb_stats: list[dict] = []
    skipped_reason = None
    backward_bs = config.mini_batch_size * config.gradient_accumulation_steps
    early_stop = False
    for _epoch in range(config.ppo_epochs):
        if early_stop or skipped_reason:
            break
        if permutations is not None:
            order = torch.as_tensor(list(next(permutations)), dtype=torch.long)
        else:
            order = torch.randperm(bs, generator=generator)
        for b_start in range(0, bs, backward_bs):
            b_inds = order[b_start:b_start + backward_bs]
            optimizer.zero_grad(set_to_none=True)
            for m_start in range(0, backward_bs, config.mini_batch_size):
                idx = b_inds[m_start:m_start + config.mini_batch_size]
                if idx.numel() == 0:
                    continue
                part = {k: v[idx.to(v.device)] for k, v in inputs.items()}
                idx_d = idx.to(device)
                new_logits, vpreds = policy(**part)
                new_logits = new_logits[:, :-1, :]
                vpreds = vpreds[:, :-1]
                new_logprobs = core.logprobs_from_logits(new_logits, part["decoder_input_ids"][:, 1:])
                loss, mstats, ratio_skip = _minibatch_loss(
                    new_logprobs, new_logits, vpreds, logprobs[idx_d], values[idx_d], masks[idx_d],
                    advantages[idx_d], returns[idx_d], config)
                if not torch.isfinite(loss):
                    skipped_reason = "non-finite loss"
                    break
                mb_stats.append(mstats)
                if ratio_skip and not config.trl_compat:
                    continue  # the harness skips the update; TRL steps Adam on a zero loss
                (loss / config.gradient_accumulation_steps).backward()
            if skipped_reason:
                break
            grads_finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in policy.trainable_parameters())
            if not grads_finite:
                skipped_reason = "non-finite gradient"
                break
            if config.max_grad_norm is not None and not (config.trl_compat and getattr(optimizer, "_trl_clipped", False)):
                torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), config.max_grad_norm)
                # TRL 0.11.4 clips with a one-shot filter() iterator: only the first mini-batch of the
                # trainer's life is ever clipped (ppo_trainer.py:227, 1105). trl_compat copies that.
                optimizer._trl_clipped = True
            if any(p.grad is not None for p in policy.trainable_parameters()):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if config.early_stopping and mb_stats and mb_stats[-1]["policy/policykl"] > 1.5 * config.target_kl:
            early_stop = True
    if not skipped_reason and not all(torch.isfinite(p).all() for p in policy.trainable_parameters()):
        skipped_reason = "non-finite weights after the update"
    if skipped_reason:
        _restore(policy, optimizer, snap)
        if running is not None and running_before is not None:  # the score moments saw this batch: undo
            running.load_state_dict(running_before)
        return _skipped_stats(kl_ctl, raw, queries, responses, reason=skipped_reason, t0=t0)
    stats["time/ppo/optimize_step"] = time.time() - t

    t = time.time()
    train = _stack_mean(mb_stats)
    kl_list = (kls * masks).sum(-1)
    mean_kl = float(kl_list.mean())
    query_lens = torch.tensor([float(q.numel()) for q in queries])
    response_lens = torch.tensor([float(r.numel()) for r in responses])
    stats.update({
        "objective/kl": mean_kl,
        "objective/kl_coef": float(kl_ctl.value),
        "objective/entropy": float((-logprobs * masks).sum(-1).mean()),
        "ppo/mean_non_score_reward": float(core.masked_mean(non_score, masks)),
        "ppo/mean_scores": float(scores.mean()),
        "ppo/std_scores": float(scores.std()) if bs > 1 else 0.0,
        "env/reward_mean": float(raw.mean()),
        "env/reward_std": float(raw.std()) if bs > 1 else 0.0,
        "tokens/queries_len_mean": float(query_lens.mean()),
        "tokens/responses_len_mean": float(response_lens.mean()),
        "tokens/responses_len_std": float(response_lens.std()) if bs > 1 else 0.0,
        "tokens/empty_rate": float((response_lens <= 1).float().mean()),
        "ppo/early_stop": float(early_stop),
        "skipped": 0.0,
    })
    for k, v in train.items():
        stats[f"ppo/{k}"] = v
    stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"] \
        if stats["ppo/returns/var"] else float("nan")
    stats["ppo/learning_rate"] = float(optimizer.param_groups[0]["lr"])
    stats["time/ppo/calc_stats"] = time.time() - t
    kl_ctl.update(mean_kl, config.batch_size)
    stats["time/ppo/total"] = time.time() - t0
    return stats


def config_flag(config, name: str) -> bool:
    return bool(getattr(config, name, False))


def _minibatch_loss(logprobs, logits, vpreds, old_logprobs, old_values, mask, advantages, returns, config):
    """Policy + value loss of one mini-batch and its statistics (TRL's ``loss``)."""
    vf_loss, vf_clipfrac = core.value_loss(vpreds, old_values, returns, mask, config.cliprange_value)
    pg_loss, pg_clipfrac, ratio = core.policy_loss(logprobs, old_logprobs, advantages, mask, config.cliprange)
    loss = pg_loss + config.vf_coef * vf_loss
    avg_ratio = core.masked_mean(ratio, mask).item()
    ratio_skip = avg_ratio > config.ratio_threshold
    if ratio_skip:
        pg_loss, vf_loss, loss = pg_loss * 0.0, vf_loss * 0.0, loss * 0.0
    with torch.no_grad():
        entropy = core.masked_mean(core.entropy_from_logits(logits), mask)
        approxkl = 0.5 * core.masked_mean((logprobs - old_logprobs) ** 2, mask)
        policykl = core.masked_mean(old_logprobs - logprobs, mask)
        stats = {
            "loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(), "loss/total": loss.detach(),
            "policy/entropy": entropy, "policy/approxkl": approxkl, "policy/policykl": policykl,
            "policy/clipfrac": pg_clipfrac.detach(),
            "policy/advantages_mean": core.masked_mean(advantages, mask),
            "policy/ratio_mean": core.masked_mean(ratio, mask).detach(),
            "returns/mean": core.masked_mean(returns, mask), "returns/var": core.masked_var(returns, mask)
            if mask.sum() > 1 else torch.tensor(0.0),
            "val/vpred": core.masked_mean(vpreds, mask).detach(),
            "val/error": core.masked_mean((vpreds - returns) ** 2, mask).detach(),
            "val/clipfrac": vf_clipfrac.detach(), "val/mean": core.masked_mean(old_values, mask),
            "val/var": core.masked_var(old_values, mask) if mask.sum() > 1 else torch.tensor(0.0),
            "policy/ratio_skipped": torch.tensor(float(ratio_skip)),
        }
    return loss, stats, ratio_skip


def _skipped_stats(kl_ctl, raw_scores, queries, responses, reason: str, t0: float) -> dict[str, float]:
    finite = raw_scores[torch.isfinite(raw_scores)]
    return {
        "skipped": 1.0,
        "skip_reason": reason,
        "objective/kl_coef": float(kl_ctl.value),
        "env/reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
        "tokens/responses_len_mean": float(sum(r.numel() for r in responses) / max(len(responses), 1)),
        "time/ppo/total": time.time() - t0,
    }
