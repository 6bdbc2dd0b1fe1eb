"""Pure tensor math of PPO for sequence models: no models, no I/O, no global state.

Every function takes tensors shaped ``(batch, response_len)`` with a 0/1 ``mask`` of the same shape
marking the real response tokens (actions). Names and formulas follow TRL 0.11's ``core.py`` and
``PPOTrainer`` so that statistics stay comparable; ``suites/unit/test_ppo_core.py`` checks each
function against a plain reference loop and its invariants, and ``suites/unit/test_parity.py`` checks
the whole step against TRL's numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

KL_ESTIMATORS = ("kl", "abs", "mse", "full")


# ------------------------------------------------------------------------------------ masked stats

def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None,
                count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (over all elements, or along ``axis``).

    ``count``: divide the masked sum by this instead of ``mask.sum()``; a process of a data-parallel run
    passes the action count of the whole mini-batch, so that the processes' results add up to its mean.
    """
    if axis is None:
        return (values * mask).sum() / (mask.sum() if count is None else count)
    return (values * mask).sum(axis=axis) / mask.sum(axis=axis)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked elements, with Bessel's correction by default."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"masked_var needs at least 2 unmasked elements for an unbiased estimate, got {int(n)}")
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Scale to unit variance (and zero mean unless ``shift_mean`` is False) using masked statistics."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# ------------------------------------------------------------------------------------ log-probs

@dataclass(frozen=True)
class SampledDistribution:
    """The next-token distribution a rollout samples from, as a transform of the model's logits.

    Sampling divides the logits by ``temperature`` and bans EOS for the first ``min_new_tokens`` new
    tokens (transformers' ``min_new_tokens``). PPO's log-probs, its KL to the reference and its entropy
    must be those of the same distribution: :meth:`apply` turns decoder logits ``(B, T, V)``, where
    position t predicts new token t, into the logits of that distribution. The identity by default.
    A banned token gets the dtype's lowest finite value (probability 0 without NaN in the entropy); callers
    pass float32 logits (``PolicyWithValueHead`` upcasts), where that value minus a log-sum-exp stays finite.
    """

    temperature: float = 1.0
    min_new_tokens: int = 0
    eos_token_id: int | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"SampledDistribution: temperature must be > 0, got {self.temperature!r}")
        if self.min_new_tokens and self.eos_token_id is None:
            raise ValueError("SampledDistribution: min_new_tokens bans EOS, so it needs eos_token_id")

    @classmethod
    def of(cls, sampling, eos_token_id: int | None) -> SampledDistribution:
        """From a config's sampling section (``temperature``, ``min_new_tokens``)."""
        temperature = float(sampling.temperature) if sampling.do_sample else 1.0  # greedy ignores it
        return cls(temperature, int(sampling.min_new_tokens), eos_token_id if sampling.min_new_tokens else None)

    @property
    def is_identity(self) -> bool:
        return self.temperature == 1.0 and not self.min_new_tokens

    def logprobs_at(self, logits: torch.Tensor, tokens: torch.Tensor, position: int) -> torch.Tensor:
        """Log-probs of ``tokens`` (B,) under this distribution from one decoding position's logits (B, V):
        what :meth:`apply` then :func:`logprobs_from_logits` give at ``position``, for a decode loop."""
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if position < self.min_new_tokens:
            logits = logits.clone()
            logits[:, self.eos_token_id] = torch.finfo(logits.dtype).min
        return token_logprobs(logits, tokens.reshape(-1))[0]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.min_new_tokens:
            banned = torch.zeros(logits.shape[-2:], dtype=torch.bool, device=logits.device)
            banned[:self.min_new_tokens, self.eos_token_id] = True
            logits = logits.masked_fill(banned, torch.finfo(logits.dtype).min)
        return logits


# Where softmax probabilities below exp(PROB_FLOOR) are taken as 0 (in the entropy and in the gradient; never
# in a log-prob). x86 CPUs compute with subnormal floats (below 1.2e-38) up to a hundred times slower, and
# a softmax over 32,128 tokens whose logits spread over a hundred nats is full of them: so is the gradient of
# its logits, and the language-model head's backward matmul over it. exp(-60) = 8.8e-27: what the floor drops
# sums to under 32,128 x 8.8e-27 = 3e-22 of a distribution, far below float32's resolution of 1.
PROB_FLOOR = -60.0


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor | None, gather: bool = True) -> torch.Tensor:
    """log softmax of ``logits`` (B, T, V), gathered at ``labels`` (B, T) unless ``gather`` is False.

    Gathered, it is :func:`token_logprobs`: differentiable, with a fused backward pass."""
    if not gather:
        return F.log_softmax(logits, dim=-1)
    return token_logprobs(logits, labels)[0]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, entropy: bool = False):
    """``(log-probs of labels, entropy or None)`` from logits ``(..., V)`` and labels ``(...)``.

    One log-softmax (a fused kernel), gathered at the labels. With ``entropy`` (or when a gradient will be
    needed) also the probabilities, floored at :data:`PROB_FLOOR`; the entropy is ``-sum(p * log p)`` and
    carries no gradient. Differentiable in ``logits``: the backward pass is ``g * (onehot(label) - p)``
    written into the saved probabilities, one (..., V) tensor in all, where autograd's ``gather`` and
    ``logsumexp`` backward passes write three and compute ``exp`` of every logit again
    (:class:`_TokenLogProbs`).
    """
    if logits.requires_grad and torch.is_grad_enabled():
        lp, ent = _TokenLogProbs.apply(logits, labels)
        return lp, (ent if entropy else None)
    with torch.no_grad():
        lsm, lp = _log_softmax_at(logits, labels)
        return lp, (_entropy(_floored_probs(lsm), lsm) if entropy else None)


def _log_softmax_at(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-softmax of ``logits`` and its values at ``labels``."""
    lsm = F.log_softmax(logits, dim=-1)
    return lsm, lsm.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _floored_probs(lsm: torch.Tensor) -> torch.Tensor:
    """``exp(lsm)``, 0 where ``lsm < PROB_FLOOR`` (no subnormal result, and ``exp`` never underflows)."""
    return lsm.clamp(min=PROB_FLOOR).exp_().masked_fill_(lsm < PROB_FLOOR, 0.0)


def _entropy(p: torch.Tensor, lsm: torch.Tensor) -> torch.Tensor:
    """``-sum(p * log p)``, the sum fused (``vecdot``); a banned token (p = 0, ``finfo.min``) adds nothing."""
    return -torch.linalg.vecdot(p, lsm)


class _TokenLogProbs(torch.autograd.Function):
    """log_softmax(logits).gather(labels) and the (non-differentiable) entropy, with a fused backward.

    Saves the floored probabilities and overwrites them with the gradient: backward runs once (a
    ``retain_graph`` second backward is refused) and is not itself differentiable (no second derivatives)."""

    @staticmethod
    def forward(ctx, logits, labels):
        lsm, lp = _log_softmax_at(logits, labels)
        p = _floored_probs(lsm)
        ent = _entropy(p, lsm)
        ctx.save_for_backward(p, labels)
        ctx.mark_non_differentiable(ent)
        ctx.used = False
        return lp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp, _grad_entropy):
        if ctx.used:
            raise RuntimeError("token_logprobs: its backward pass reuses its saved probabilities and runs once")
        ctx.used = True
        p, labels = ctx.saved_tensors
        grad = p.mul_(-grad_lp.unsqueeze(-1))
        grad.scatter_add_(-1, labels.unsqueeze(-1), grad_lp.unsqueeze(-1))
        return grad, None


# ------------------------------------------------------------------------------------ KL

def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Per-token KL estimate between policy and reference.

    ``kl``, ``abs`` and ``mse`` take the log-probs of the sampled tokens, (B, T); ``full`` takes the
    full log-distributions, (B, T, V), and returns the exact KL(policy || reference) per token.
    """
    if kind == "kl":
        return logprob - ref_logprob
    if kind == "abs":
        return (logprob - ref_logprob).abs()
    if kind == "mse":
        return 0.5 * (logprob - ref_logprob).square()
    if kind == "full":
        # kl_div(input=log q, target=log p, log_target) = sum p (log p - log q) = KL(p || q)
        return F.kl_div(ref_logprob, logprob, log_target=True, reduction="none").sum(-1)
    raise ValueError(f"kl_penalty: unknown estimator {kind!r}, accepted: {', '.join(KL_ESTIMATORS)}")


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019): beta *= 1 + clip(kl/target - 1, +-0.2) * n / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current: float, n_steps: int) -> None:
        proportional_error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def make_kl_controller(adaptive: bool, init_kl_coef: float, target: float, horizon: float):
    return AdaptiveKLController(init_kl_coef, target, horizon) if adaptive else FixedKLController(init_kl_coef)


# ------------------------------------------------------------------------------------ rewards

def compute_rewards(scores: torch.Tensor, kls: torch.Tensor, mask: torch.Tensor, kl_coef: float):
    """Per-token rewards: ``-kl_coef * kl_t`` everywhere, plus the score on the last response token.

    Returns ``(rewards, non_score_rewards)``, both (B, T). A row with no unmasked token gets no score.
    """
    non_score = -kl_coef * kls
    rewards = non_score.clone()
    lengths = mask.sum(-1)
    has_token = lengths > 0
    # index of the last unmasked token of each row
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    rows = torch.arange(mask.shape[0], device=mask.device)[has_token]
    rewards[rows, last[has_token]] += scores[has_token].to(rewards.dtype)
    return rewards, non_score


def compute_gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
                whiten_rewards: bool = False, mask_whitened: bool = True):
    """Generalized advantage estimation, TRL-style (values and rewards zeroed outside the mask).

    Returns ``(values, advantages, returns)``: values masked, advantages whitened over the mask,
    returns = raw advantages + values.

    With ``whiten_rewards`` the rewards are whitened over the mask and, unless ``mask_whitened`` is
    False, zeroed again on the padding: whitening without re-centring moves a padded 0 to
    ``-mean/std + mean``, which the reverse loop would carry into the real tokens' advantages, so a
    response's returns would depend on how much padding the other rows force on it. TRL 0.11.4 has
    that leak; ``mask_whitened=False`` (``TRLQuirks.leak_whitened_padding``, on with ``ppo.trl_compat``)
    reproduces it.
    """
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
        if mask_whitened:
            rewards = rewards * mask
    gen_len = rewards.shape[-1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, mask).detach()
    return values, advantages, returns


# ------------------------------------------------------------------------------------ losses

def clip_by_value(x: torch.Tensor, tensor_min: torch.Tensor, tensor_max: torch.Tensor) -> torch.Tensor:
    return torch.max(torch.min(x, tensor_max), tensor_min)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float, count: torch.Tensor | float | None = None):
    """Clipped surrogate objective. Returns ``(loss, clipfrac, ratio)``; ``count`` as :func:`masked_mean`'s."""
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask, count=count)
    clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses).float(), mask, count=count)
    return loss, clipfrac, ratio


def value_loss(vpreds: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float, count: torch.Tensor | float | None = None):
    """Clipped value loss, 0.5 * max((v - R)^2, (clip(v) - R)^2). Returns ``(loss, clipfrac)``; ``count`` as
    :func:`masked_mean`'s."""
    vpredclipped = clip_by_value(vpreds, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask, count=count)
    clipfrac = masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask, count=count)
    return loss, clipfrac


# ------------------------------------------------------------------------------------ scores

class RunningMoments:
    """Running mean and standard deviation of scores (Chan et al.'s parallel update), for score scaling."""

    def __init__(self):
        self.mean = 0.0
        self.std = 1.0
        self.var = 1.0
        self.count = 1e-24

    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        xs = xs.double()
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        xs_mean, xs_var = float(xs_mean), float(xs_var)
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta ** 2 * self.count * xs_count / tot_count
        self.mean += delta * xs_count / tot_count
        self.var = (old_sum + new_sum) / tot_count
        self.std = (self.var * tot_count / max(tot_count - 1, 1e-24)) ** 0.5
        self.count = tot_count
        return xs_mean, (xs_var * xs_count / max(xs_count - 1, 1)) ** 0.5

    def state_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.std, self.var, self.count = state["mean"], state["std"], state["var"], state["count"]


def transform_scores(scores: torch.Tensor, running: RunningMoments | None, scaling: bool, norm: bool,
                     clip: float | None) -> torch.Tensor:
    """Optional score scaling (by a running std), normalization (minus a running mean) and clipping."""
    scores = scores.float()
    if scaling:
        if running is None:
            raise ValueError("score scaling needs the running moments (RunningMoments)")
        running.update(scores)
        factor = running.std + torch.finfo(scores.dtype).eps
        scores = (scores - running.mean) / factor if norm else scores / factor
    if clip is not None:
        scores = torch.clamp(scores, -clip, clip)
    return scores
