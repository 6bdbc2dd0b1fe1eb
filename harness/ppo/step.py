"""One PPO update of a seq2seq policy on (query, response, score) triples.

The algorithm and the statistic names are TRL 0.11.4's ``PPOTrainer.step`` for encoder-decoder
models; ``docs/ppo.md`` lists where the harness deliberately differs. Each difference that changes the
numbers is a field of :class:`TRLQuirks` (all on with ``ppo.trl_compat``), so that
``suites/unit/test_parity.py`` can compare number for number.

:func:`ppo_step` is a composition of four phases, each a function with plain inputs and outputs:

(a) :func:`old_outputs`: log-probs and values of the policy before the update, reference log-probs;
(b) :func:`kl_rewards` and :func:`advantages`: per-token KL penalty plus score, GAE;
(c) :func:`optimise`: mini-batch epochs; a non-finite loss, gradient or weight undoes all of them;
(d) :func:`step_statistics`: TRL's statistics.

What lives as long as the run is a :class:`PPOState`, owned by the caller (the trainer): the settings every
step reads (:class:`StepSettings`: config, token ids, score options, the distribution read, the processes) and
what changes from step to step and a checkpoint keeps (optimizer, KL controller, running score moments, the
quirks' state).

Responses are *actions only*: the decoder start token is not part of them (:mod:`harness.ppo.batch`).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

import torch

from ..config import PPOConfig
from ..parallel import SINGLE, Parallel
from . import core
from .batch import Recorded, predicting, prepare_inputs, response_mask

if TYPE_CHECKING:
    from ..config import RewardConfig

KLController = core.AdaptiveKLController | core.FixedKLController


# ------------------------------------------------------------------------------------ options and state

@dataclass(frozen=True)
class ScoreOptions:
    """How the classifier's rewards become the scores PPO optimises (``reward.score_*`` in the config).

    TRL's ``use_score_scaling``, ``use_score_norm`` and ``score_clip``; all off by default. The running
    moments they use are part of :class:`PPOState` (they carry over from step to step).
    """

    scaling: bool = False  # divide by the running std of every score seen so far
    norm: bool = False  # also subtract the running mean first (only together with scaling)
    clip: float | None = None  # then clamp to [-clip, clip]

    def __post_init__(self):
        if self.norm and not self.scaling:
            raise ValueError("ScoreOptions: norm needs scaling (TRL ignores use_score_norm without use_score_scaling)")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"ScoreOptions: clip must be > 0 or None, got {self.clip!r}")

    @classmethod
    def from_reward_config(cls, reward: RewardConfig) -> ScoreOptions:
        return cls(scaling=reward.score_scaling, norm=reward.score_norm, clip=reward.score_clip)

    def apply(self, scores: torch.Tensor, running: core.RunningMoments) -> torch.Tensor:
        """The transformed scores; with ``scaling`` this updates ``running`` with the batch first."""
        return core.transform_scores(scores, running, self.scaling, self.norm, self.clip)


@dataclass
class TRLQuirks:
    """TRL 0.11.4 behaviours the harness does not copy by default, each switchable for parity.

    All off is the harness; all on (:meth:`from_config` with ``ppo.trl_compat``) is TRL 0.11.4 number for
    number (docs/ppo.md, "Where the harness deliberately differs", rows 1, 2, 3, 10 and 11).

    The object is mutable: ``clip_only_first_minibatch`` needs to remember whether this optimizer has
    clipped before, over its whole life, so the quirks belong to whoever owns the optimizer (a
    :class:`PPOState`), never to one step.
    """

    # row 1: the first generated token is not an action (TRL's ``start = 1`` in batched_forward_pass)
    mask_first_action: bool = False
    # row 10: whitened rewards are not zeroed again on the padding, which then leaks into the returns
    leak_whitened_padding: bool = False
    # row 2: a mini-batch over ``ratio_threshold`` gets a zero loss but still backward + Adam step
    zero_loss_adam_step_on_ratio_skip: bool = False
    # row 3: ``max_grad_norm`` clips only the first optimizer step of the optimizer's life (TRL clips
    # with a one-shot ``filter()`` iterator, ppo_trainer.py:227 and 1105)
    clip_only_first_minibatch: bool = False
    # row 11: log-probs, KL and entropy of the raw softmax, whatever distribution the rollout sampled from
    unsampled_distribution: bool = False
    # state of the last one: an optimizer step of this optimizer has been clipped already
    clipped_once: bool = field(default=False, compare=False)

    @classmethod
    def from_config(cls, config: PPOConfig) -> TRLQuirks:
        """All quirks on with ``config.trl_compat``, all off otherwise."""
        on = bool(config.trl_compat)
        return cls(mask_first_action=on, leak_whitened_padding=on, zero_loss_adam_step_on_ratio_skip=on,
                   clip_only_first_minibatch=on, unsampled_distribution=on)

    def clips(self, max_grad_norm: float | None) -> bool:
        """Whether the coming optimizer step clips its gradients."""
        return max_grad_norm is not None and not (self.clip_only_first_minibatch and self.clipped_once)

    def state_dict(self) -> dict:
        return {"clipped_once": self.clipped_once}

    def load_state_dict(self, state: dict) -> None:
        self.clipped_once = bool(state["clipped_once"])


@dataclass(frozen=True)
class StepSettings:
    """What every PPO step of one run reads and none changes; held by the run's :class:`PPOState`.

    ``distribution`` is the one the step reads log-probs, KL and entropy from (:class:`core.SampledDistribution`):
    :meth:`PPOState.create` decides it, once per run, from the distribution the rollout samples from and the
    quirks. ``parallel``: the processes of the run (:data:`harness.parallel.SINGLE`: one, the identity).
    """

    config: PPOConfig
    pad_token_id: int
    decoder_start_token_id: int
    score_options: ScoreOptions = ScoreOptions()
    distribution: core.SampledDistribution = core.SampledDistribution()
    parallel: Parallel = SINGLE


@dataclass
class PPOState:
    """What one PPO step reads and updates besides the policy's weights: the run's :class:`StepSettings`, and
    what lives from step to step and a checkpoint must keep (optimizer, KL controller, score moments, quirks)."""

    optimizer: torch.optim.Optimizer
    kl_ctl: KLController
    settings: StepSettings
    running: core.RunningMoments = field(default_factory=core.RunningMoments)  # score moments (ScoreOptions)
    quirks: TRLQuirks = field(default_factory=TRLQuirks)

    @classmethod
    def create(cls, policy, config: PPOConfig, *, rollout: core.SampledDistribution = core.SampledDistribution(),
               score_options: ScoreOptions = ScoreOptions(), parallel: Parallel = SINGLE,
               pad_token_id: int | None = None, decoder_start_token_id: int | None = None) -> PPOState:
        """A fresh state for training ``policy``: Adam, the configured KL controller, quirks from ``trl_compat``.

        ``rollout`` is the distribution the rollout samples from; the step reads log-probs from it, or, with
        ``TRLQuirks.unsampled_distribution`` (TRL 0.11.4), from the raw softmax: decided here and nowhere else.
        The token ids default to the policy's (its tokenizer's pad, its config's decoder start).
        """
        quirks = TRLQuirks.from_config(config)
        settings = StepSettings(
            config,
            pad_token_id=policy.tokenizer.pad_token_id if pad_token_id is None else pad_token_id,
            decoder_start_token_id=(policy.config.decoder_start_token_id if decoder_start_token_id is None
                                    else decoder_start_token_id),
            score_options=score_options,
            distribution=core.SampledDistribution() if quirks.unsampled_distribution else rollout,
            parallel=parallel)
        return cls(optimizer=make_optimizer(policy, config),
                   kl_ctl=core.make_kl_controller(config.adap_kl_ctrl, config.init_kl_coef, config.target,
                                                  config.horizon),
                   settings=settings, running=core.RunningMoments(), quirks=quirks)


def make_optimizer(policy, config: PPOConfig) -> torch.optim.Optimizer:
    """Adam over the trainable parameters (LoRA + value head), as TRL's default."""
    return torch.optim.Adam(policy.trainable_parameters(), lr=config.learning_rate)


def random_orders(batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Endless random permutations of the batch's rows, one per PPO epoch (``generator=None``: torch's global RNG)."""
    while True:
        yield torch.randperm(batch_size, generator=generator)


# ------------------------------------------------------------------------------------ the step

def ppo_step(policy, state: PPOState, queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor],
             scores: torch.Tensor, *, orders: Iterator[Sequence[int]] | None = None,
             recorded: Recorded | None = None) -> dict[str, float]:
    """Run one PPO step and return its statistics (TRL 0.11 names) as floats.

    ``scores`` are the classifier's rewards, one per response; ``state.settings.score_options`` transforms
    them (with ``state.running``) into what PPO optimises. ``env/reward_*`` report them as given,
    ``ppo/*_scores`` as transformed. Log-probs, KL and entropy are those of ``state.settings.distribution``.
    ``orders`` yields one row order per epoch (e.g. TRL's permutations, for replay); by default they are drawn
    from torch's global RNG (see :func:`random_orders`). ``recorded``: the policy's log-probs and values
    recorded by the rollout (:class:`Recorded`), so that phase (a) runs the reference only; they must be of
    the distribution the step reads, and ``kl_penalty`` "full" (which needs every logit) cannot use them.

    A non-finite score, loss (e.g. from a NaN logit or value), gradient or updated weight skips the whole
    update: every trainable weight, the optimizer state, the running score moments and the quirks'
    state are restored to what they were before the step, and the statistics carry ``skipped = 1`` and
    ``skip_reason``.

    Data-parallel (``state.settings.parallel`` of several processes): the rows given are this process's share
    of the batch (every process the same number); the step gathers the rows' tensors after the forward passes,
    so that every global quantity (score moments, whitening, KL, statistics, the KL controller's input) is the
    whole batch's, and sums the gradients of each optimizer step over the processes. ``orders`` is then
    required and must be the same on every process (the global row orders). Every process returns the same
    statistics and ends with the same weights (docs/scale.md).
    """
    t0 = time.time()
    settings = state.settings
    config, parallel, distribution = settings.config, settings.parallel, settings.distribution
    if not len(queries) == len(responses) == len(scores):
        raise ValueError(f"ppo_step: {len(queries)} queries, {len(responses)} responses and {len(scores)} scores "
                         "must match")
    _check_quirks(config, state.quirks)
    raw = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    mine = None  # this process's rows of the batch, when the batch is shared by several processes
    if parallel.distributed:
        if orders is None:
            raise ValueError("ppo_step: a data-parallel step needs `orders`, the same global row orders on every "
                             "process (torch's global RNG may differ between processes)")
        queries, responses, raw, mine = _gather_rows(parallel, queries, responses, raw)
    if not torch.isfinite(raw).all():
        return _skipped_stats(state.kl_ctl, raw, responses, reason="non-finite score", t0=t0)
    _check_sampled(responses, distribution)
    if recorded is not None:
        _check_recorded(recorded, responses if mine is None else responses[mine], distribution, config)
    running_before = state.running.state_dict()
    scores = settings.score_options.apply(raw.to(policy.device), state.running)

    policy.eval()  # dropout off for rollout scoring and training alike (see docs/ppo.md)
    inputs = prepare_inputs(queries, responses, settings.pad_token_id, settings.decoder_start_token_id,
                            policy.device)
    stats: dict[str, float] = {}
    # forward passes and rewards of this process's rows (all of them with one process), then the whole batch's
    part, part_scores = (inputs, scores) if mine is None else ({k: v[mine] for k, v in inputs.items()}, scores[mine])
    with _timed(stats, "time/ppo/forward_pass"):
        old = old_outputs(policy, part, chunk=config.mini_batch_size, full_logits=config.kl_penalty == "full",
                          mask_first_action=state.quirks.mask_first_action, distribution=distribution,
                          recorded=recorded)
    with _timed(stats, "time/ppo/compute_rewards"):
        kls, rewards, non_score = kl_rewards(old, part_scores, config.kl_penalty, state.kl_ctl.value)
        if parallel.distributed:
            old = OldOutputs(*(parallel.gather(t) for t in (old.logprobs, old.values, old.ref_logprobs, old.masks)))
            kls, rewards, non_score = (parallel.gather(t) for t in (kls, rewards, non_score))
    old = replace(old, logits=None, ref_logits=None)  # (B, T, V) each: not needed past the KL
    with _timed(stats, "time/ppo/compute_advantages"):
        experience = advantages(old, rewards, config, leak_whitened_padding=state.quirks.leak_whitened_padding)

    with _timed(stats, "time/ppo/optimize_step"):
        result = optimise(policy, state, inputs, experience,
                          orders if orders is not None else random_orders(len(queries)))
    if result.skip_reason is not None:
        state.running.load_state_dict(running_before)  # the score moments saw this batch: undo
        return _skipped_stats(state.kl_ctl, raw, responses, reason=result.skip_reason, t0=t0)

    with _timed(stats, "time/ppo/calc_stats"):
        stats.update(step_statistics(queries, responses, raw, scores, old, kls, non_score, result,
                                     kl_coef=state.kl_ctl.value, learning_rate=state.optimizer.param_groups[0]["lr"]))
    state.kl_ctl.update(stats["objective/kl"], config.batch_size)
    stats["time/ppo/total"] = time.time() - t0
    return stats


def _gather_rows(parallel: Parallel, queries, responses, raw: torch.Tensor):
    """The whole batch from every process's share: (queries, responses, raw scores, this process's rows)."""
    sizes = parallel.gather_object([len(queries)])
    if len(set(sizes)) != 1:
        raise ValueError(f"ppo_step: the processes hold {sizes} rows; each must hold the same number")
    start = parallel.rank * sizes[0]
    queries = parallel.gather_object([torch.as_tensor(q).cpu() for q in queries])
    responses = parallel.gather_object([torch.as_tensor(r).cpu() for r in responses])
    return queries, responses, parallel.gather(raw), slice(start, start + sizes[0])


def _check_quirks(config: PPOConfig, quirks: TRLQuirks) -> None:
    """``ppo.trl_compat`` with the harness's behaviour would compare against TRL with the wrong code: refuse."""
    if config.trl_compat and quirks != TRLQuirks.from_config(config):
        raise ValueError("ppo_step: config.trl_compat is on but the state's TRLQuirks are not all on; build the "
                         "state with PPOState.create(policy, config) or TRLQuirks.from_config(config)")


def _check_sampled(responses: Sequence[torch.Tensor], distribution: core.SampledDistribution) -> None:
    """A response holding EOS where ``distribution`` bans it was not sampled from it: refuse (its log-prob
    would be a huge negative number, not an error)."""
    m = distribution.min_new_tokens
    if not m:
        return
    for i, r in enumerate(responses):
        if (torch.as_tensor(r)[:m] == distribution.eos_token_id).any():
            raise ValueError(f"ppo_step: response {i} holds EOS within its first {m} tokens, which the sampled "
                             f"distribution bans (min_new_tokens={m}): it was not sampled from it")


def _check_recorded(recorded: Recorded, responses, distribution: core.SampledDistribution,
                    config: PPOConfig) -> None:
    if config.kl_penalty == "full":
        raise ValueError("ppo_step: kl_penalty 'full' needs the policy's full logits: pass recorded=None")
    if recorded.distribution != distribution:
        raise ValueError(f"ppo_step: the rollout recorded log-probs of {recorded.distribution}, the step reads "
                         f"{distribution} (state.settings.distribution): record with the step's one")
    if [int(x.numel()) for x in recorded.logprobs] != [int(torch.as_tensor(r).numel()) for r in responses] or \
            [int(x.numel()) for x in recorded.values] != [int(x.numel()) for x in recorded.logprobs]:
        raise ValueError("ppo_step: the recorded log-probs and values do not match the responses' lengths")


@contextlib.contextmanager
def _timed(stats: dict, key: str):
    t = time.time()
    yield
    stats[key] = time.time() - t


# ------------------------------------------------------------------------------------ (a) old outputs

@dataclass
class OldOutputs:
    """Phase (a): the policy and the reference on the batch before the update; (B, T) unless noted."""

    logprobs: torch.Tensor  # log-prob of each action under the policy
    values: torch.Tensor  # value head
    ref_logprobs: torch.Tensor  # log-prob of each action under the reference
    masks: torch.Tensor  # 1.0 on the actions
    logits: torch.Tensor | None = None  # (B, T, V), only for kl_penalty "full"
    ref_logits: torch.Tensor | None = None


@torch.no_grad()
def old_outputs(policy, inputs: dict, *, chunk: int, full_logits: bool, mask_first_action: bool,
                distribution: core.SampledDistribution = core.SampledDistribution(),
                recorded: Recorded | None = None) -> OldOutputs:
    """Forward passes of the policy and the reference in chunks of ``chunk`` rows, both read as ``distribution``.

    With ``recorded`` (the rollout's record) the policy's forward is skipped: its log-probs and values are those.
    """
    if recorded is None:
        logprobs, values, logits = _chunked_forward(policy, inputs, chunk, full_logits, distribution)
    else:
        logprobs, values = recorded.padded(inputs["decoder_input_ids"].shape[1] - 1, policy.device)
        logits = None
    ref_logprobs, _, ref_logits = _chunked_forward(lambda **part: (policy.reference_logits(**part), None),
                                                   inputs, chunk, full_logits, distribution)
    masks = response_mask(inputs["decoder_attention_mask"], mask_first_action=mask_first_action)
    return OldOutputs(logprobs, values, ref_logprobs, masks.to(logprobs.dtype), logits, ref_logits)


def _chunked_forward(forward, inputs: dict, chunk: int, keep_logits: bool, distribution: core.SampledDistribution):
    """``forward(**part) -> (logits, values or None)`` over the rows in chunks: (log-probs, values, logits).

    No gradient flows here, so the chunks need not be the mini-batches: rows are taken in order of prompt
    length and each chunk's encoder inputs are cut to its longest prompt (less padding to run the encoder
    over); the outputs are put back in the rows' order.
    """
    lengths = inputs["attention_mask"].sum(-1)
    order = torch.argsort(lengths, stable=True)
    all_rows, all_logprobs, all_values, all_logits = [], [], [], []
    for rows in order.split(chunk):
        width = int(lengths[rows].max())
        part = {k: v[rows] for k, v in inputs.items()}
        part["input_ids"], part["attention_mask"] = part["input_ids"][:, :width], part["attention_mask"][:, :width]
        part, labels = predicting(part)
        logits, values = forward(**part)
        logits = distribution.apply(logits)
        all_rows.append(rows)
        all_logprobs.append(core.logprobs_from_logits(logits, labels))
        if values is not None:
            all_values.append(values)
        if keep_logits:
            all_logits.append(logits)
    back = torch.argsort(torch.cat(all_rows))  # the rows' own order again
    return (torch.cat(all_logprobs)[back], torch.cat(all_values)[back] if all_values else None,
            torch.cat(all_logits)[back] if keep_logits else None)


# ------------------------------------------------------------------------------------ (b) rewards, advantages

@torch.no_grad()
def kl_rewards(old: OldOutputs, scores: torch.Tensor, kl_penalty: str, kl_coef: float):
    """Per-token KL estimate and rewards: ``(kls, rewards, non_score_rewards)``, each (B, T)."""
    if kl_penalty == "full":
        kls = core.kl_penalty(core.logprobs_from_logits(old.logits, None, gather=False),
                              core.logprobs_from_logits(old.ref_logits, None, gather=False), "full")
    else:
        kls = core.kl_penalty(old.logprobs, old.ref_logprobs, kl_penalty)
    rewards, non_score = core.compute_rewards(scores, kls, old.masks, kl_coef)
    return kls, rewards, non_score


@dataclass
class Experience:
    """What the optimisation fits, per action (B, T): the old policy's outputs and GAE's targets."""

    logprobs: torch.Tensor
    values: torch.Tensor  # masked (zero off the actions), as GAE used them
    masks: torch.Tensor
    advantages: torch.Tensor  # whitened over the batch
    returns: torch.Tensor

    def rows(self, idx: torch.Tensor) -> Experience:
        return Experience(*(getattr(self, f.name)[idx] for f in fields(self)))

    def first(self, width: int) -> Experience:
        """The first ``width`` positions (those past every row's last action are masked: nothing changes)."""
        return Experience(*(getattr(self, f.name)[:, :width] for f in fields(self)))


def _trimmed(part: dict, like: dict | None = None) -> tuple[dict, int]:
    """A mini-batch's inputs cut to its own longest prompt and response (the batch is padded to the batch's
    longest): no forward or backward over columns that are padding in every row. Returns the inputs and
    the number of action positions left. ``like``: cut to the widths of these inputs instead (a process's
    share of a mini-batch is cut like the whole mini-batch, so that it computes what one process would)."""
    ref = part if like is None else like
    enc = int(ref["attention_mask"].sum(-1).max())
    dec = int(ref["decoder_attention_mask"].sum(-1).max())
    part = dict(part, input_ids=part["input_ids"][:, :enc], attention_mask=part["attention_mask"][:, :enc],
                decoder_input_ids=part["decoder_input_ids"][:, :dec],
                decoder_attention_mask=part["decoder_attention_mask"][:, :dec])
    return part, dec - 1


@torch.no_grad()
def advantages(old: OldOutputs, rewards: torch.Tensor, config: PPOConfig, *, leak_whitened_padding: bool) -> Experience:
    """GAE (``config.gamma``, ``config.lam``, ``config.whiten_rewards``) over the old values."""
    values, adv, returns = core.compute_gae(old.values, rewards, old.masks, config.gamma, config.lam,
                                            config.whiten_rewards, mask_whitened=not leak_whitened_padding)
    return Experience(old.logprobs, values, old.masks, adv, returns)


# ------------------------------------------------------------------------------------ (c) optimisation

@dataclass
class Optimisation:
    """Phase (c)'s outcome: the statistics of every mini-batch run, in order, or why it was all undone."""

    minibatch_stats: list[dict]
    early_stop: bool = False
    skip_reason: str | None = None


def optimise(policy, state: PPOState, inputs: dict, experience: Experience,
             orders: Iterator[Sequence[int]]) -> Optimisation:
    """``ppo_epochs`` passes over the batch in mini-batches, one optimizer step per
    ``mini_batch_size x gradient_accumulation_steps`` rows; early stop after an epoch whose last mini-batch's
    policy KL passes ``1.5 x target_kl`` (the settings are ``state.settings.config``'s).

    A non-finite loss or gradient stops at once, and non-finite weights at the end count the same: the
    weights, the optimizer state and the quirks' state are then restored to what they were at the start (and
    before an exception, e.g. ``orders`` running out, propagates).

    With several processes, ``inputs`` and ``experience`` are the whole batch's; each process forwards its
    share of every mini-batch (:func:`_minibatch_loss`) and the gradients are summed over the processes before
    each optimizer step.
    """
    snapshot = _snapshot(policy, state)
    try:
        done = _epochs(policy, state, inputs, experience, orders)
    except BaseException:
        _restore(policy, state, snapshot)
        raise
    if not done.skip_reason and not _all_finite(policy.trainable_parameters()):
        done.skip_reason = "non-finite weights after the update"
    if done.skip_reason:
        _restore(policy, state, snapshot)
    return done


def _epochs(policy, state: PPOState, inputs: dict, experience: Experience,
            orders: Iterator[Sequence[int]]) -> Optimisation:
    config = state.settings.config
    batch_size = inputs["input_ids"].shape[0]
    done = Optimisation([])
    backward_bs = config.mini_batch_size * config.gradient_accumulation_steps
    for _epoch in range(config.ppo_epochs):
        order = _next_order(orders, batch_size)
        for start in range(0, batch_size, backward_bs):
            stats, done.skip_reason = _optimizer_step(policy, state, inputs, experience,
                                                      order[start:start + backward_bs])
            done.minibatch_stats += stats
            if done.skip_reason:
                return done
        if config.early_stopping and done.minibatch_stats[-1]["policy/policykl"] > 1.5 * config.target_kl:
            done.early_stop = True  # TRL checks the last mini-batch of the epoch only
            return done
    return done


def _all_finite(tensors) -> bool:
    """Whether every element of every tensor is finite: one host sync for all of them, not one per tensor."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return not flags or bool(torch.stack(flags).all())


def _next_order(orders: Iterator[Sequence[int]], batch_size: int) -> torch.Tensor:
    try:
        order = torch.as_tensor(list(next(orders)), dtype=torch.long)
    except StopIteration:
        raise ValueError("ppo_step: orders ran out: it must yield one row order per PPO epoch") from None
    if sorted(order.tolist()) != list(range(batch_size)):
        raise ValueError(f"ppo_step: a row order must be a permutation of range({batch_size}), got {order.tolist()}")
    return order


def _optimizer_step(policy, state: PPOState, inputs: dict, experience: Experience,
                    rows: torch.Tensor) -> tuple[list[dict], str | None]:
    """Gradients of ``rows`` accumulated mini-batch by mini-batch, then one optimizer step.

    Returns the mini-batches' statistics and, if something was non-finite, the reason (nothing stepped).
    Each process forwards every ``world_size``-th row of each mini-batch (with one process: all of them).
    """
    config, parallel, quirks = state.settings.config, state.settings.parallel, state.quirks
    distribution, optimizer = state.settings.distribution, state.optimizer
    optimizer.zero_grad(set_to_none=True)
    stats = []
    for start in range(0, len(rows), config.mini_batch_size):
        idx = rows[start:start + config.mini_batch_size]
        mine = idx[parallel.rank::parallel.world_size]
        whole = {k: v[idx.to(v.device)] for k, v in inputs.items()}
        part, width = _trimmed({k: v[mine.to(v.device)] for k, v in inputs.items()}, like=whole)
        if width == 0:  # its loss would be 0 / 0: the step is skipped, as one with a non-finite loss
            return stats, "a mini-batch without an action (each of its responses is empty)"
        part, labels = predicting(part)
        new_logits, vpreds = policy(**part, encoder_chunk=_encoder_chunk(part["attention_mask"]))
        new_logprobs, entropy = core.token_logprobs(distribution.apply(new_logits), labels, entropy=True)
        del new_logits  # the backward pass needs only what token_logprobs saved
        loss, mstats, ratio_skip = _minibatch_loss(new_logprobs, entropy, vpreds,
                                                   experience.rows(mine.to(policy.device)).first(width),
                                                   experience.rows(idx.to(policy.device)).first(width),
                                                   config, parallel)
        if not bool(torch.isfinite(mstats["loss/total"])):
            return stats, "non-finite loss"
        stats.append(mstats)
        if ratio_skip and not quirks.zero_loss_adam_step_on_ratio_skip:
            continue  # the harness skips the update; TRL steps Adam on a zero loss
        (loss / config.gradient_accumulation_steps).backward()
    params = policy.trainable_parameters()  # a walk over every module: once per optimizer step
    parallel.sum_gradients(params)
    if not _all_finite(p.grad for p in params if p.grad is not None):
        return stats, "non-finite gradient"
    if quirks.clips(config.max_grad_norm):
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        quirks.clipped_once = True
    if any(p.grad is not None for p in params):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stats, None


def _encoder_chunk(attention_mask: torch.Tensor) -> int | None:
    """How a mini-batch's prompts are encoded: on a CPU each alone, at its own length (1), elsewhere together.

    On a CPU the encoder then runs over no padding (random mini-batches of prompts of 150 to 250 tokens are
    some 13% padding once cut to their longest), at a cost of some 9% per token against four prompts together,
    forward and backward (flan-t5-base, one thread). And a prompt's encoder output no longer depends on the
    mini-batch it is in, nor on how a data-parallel step shares that mini-batch out: the processes compute
    what one process would more closely (suites/integration/test_data_parallel.py). A GPU runs one prompt
    at a time far below its capacity, and padding costs it less: it encodes the mini-batch together (None).
    """
    return 1 if attention_mask.device.type == "cpu" else None


#: the statistics of a mini-batch that are sums over its rows, hence over the processes that share it
MINIBATCH_PARTS = ("loss/policy", "loss/value", "loss/total", "policy/entropy", "policy/approxkl", "policy/policykl",
                   "policy/clipfrac", "policy/ratio_mean", "val/vpred", "val/error", "val/clipfrac")


def _minibatch_loss(logprobs, entropy, vpreds, mine: Experience, whole: Experience, config: PPOConfig,
                    parallel: Parallel):
    """Policy + value loss of this process's rows ``mine`` of a mini-batch whose rows are ``whole``, and the
    mini-batch's statistics (TRL's ``loss``); ``entropy`` is each position's (no gradient).

    Every masked mean is divided by the action count of the whole mini-batch, so the processes' losses and
    statistics add up to the whole mini-batch's: the statistics are summed over the processes here (one
    all-reduce), the gradients after the backward passes. Statistics of the old outputs alone (advantages,
    returns, values) come from ``whole``. With one process ``mine`` is ``whole`` and every sum the identity.
    Returns ``(loss, stats, ratio_skip)``, the last two the same on every process.
    """
    n = whole.masks.sum()
    mask = mine.masks
    vf_loss, vf_clipfrac = core.value_loss(vpreds, mine.values, mine.returns, mask, config.cliprange_value, count=n)
    pg_loss, pg_clipfrac, ratio = core.policy_loss(logprobs, mine.logprobs, mine.advantages, mask, config.cliprange,
                                                   count=n)
    loss = pg_loss + config.vf_coef * vf_loss
    with torch.no_grad():
        def part(values):
            return core.masked_mean(values, mask, count=n)

        local = torch.stack([pg_loss, vf_loss, loss, part(entropy),
                             0.5 * part((logprobs - mine.logprobs) ** 2), part(mine.logprobs - logprobs), pg_clipfrac,
                             part(ratio), part(vpreds), part((vpreds - mine.returns) ** 2), vf_clipfrac]).float()
        total = dict(zip(MINIBATCH_PARTS, parallel.sum(local)))
        ratio_skip = float(total["policy/ratio_mean"]) > config.ratio_threshold
        if ratio_skip:
            for k in ("loss/policy", "loss/value", "loss/total"):
                total[k] = total[k] * 0.0
        wmask = whole.masks
        several = wmask.sum() > 1
        stats = {  # TRL's order
            **{k: total[k] for k in MINIBATCH_PARTS[:7]},
            "policy/advantages_mean": core.masked_mean(whole.advantages, wmask),
            "policy/ratio_mean": total["policy/ratio_mean"],
            "returns/mean": core.masked_mean(whole.returns, wmask),
            "returns/var": core.masked_var(whole.returns, wmask) if several else torch.tensor(0.0),
            **{k: total[k] for k in MINIBATCH_PARTS[8:]},
            "val/mean": core.masked_mean(whole.values, wmask),
            "val/var": core.masked_var(whole.values, wmask) if several else torch.tensor(0.0),
            "policy/ratio_skipped": torch.tensor(float(ratio_skip)),
        }
    if ratio_skip:
        loss = loss * 0.0  # TRL's quirk still steps Adam on it; the harness skips the backward
    return loss, stats, ratio_skip


def _snapshot(policy, state: PPOState):
    params = [p.detach().clone() for p in policy.trainable_parameters()]
    return params, copy.deepcopy(state.optimizer.state_dict()), state.quirks.state_dict()


def _restore(policy, state: PPOState, snapshot) -> None:
    params, opt_state, quirks_state = snapshot
    with torch.no_grad():
        for p, saved in zip(policy.trainable_parameters(), params):
            p.copy_(saved)
    state.optimizer.load_state_dict(opt_state)
    state.optimizer.zero_grad(set_to_none=True)
    state.quirks.load_state_dict(quirks_state)


# ------------------------------------------------------------------------------------ (d) statistics

def step_statistics(queries, responses, raw_scores: torch.Tensor, scores: torch.Tensor, old: OldOutputs,
                    kls: torch.Tensor, non_score: torch.Tensor, optimisation: Optimisation, *, kl_coef: float,
                    learning_rate: float) -> dict[str, float]:
    """TRL's statistics of a step that was applied, plus the harness's (docs/ppo.md, row 8).

    ``raw_scores`` are the rewards as given (``env/reward_*``), ``scores`` what PPO optimised
    (``ppo/*_scores``); ``kl_coef`` is the coefficient the rewards used (before the controller's update).
    """
    bs = len(queries)
    masks = old.masks
    query_lens = torch.tensor([float(q.numel()) for q in queries])
    response_lens = torch.tensor([float(r.numel()) for r in responses])
    stats = {
        "objective/kl": float((kls * masks).sum(-1).mean()),
        "objective/kl_coef": float(kl_coef),
        "objective/entropy": float((-old.logprobs * masks).sum(-1).mean()),
        "ppo/mean_non_score_reward": float(core.masked_mean(non_score, masks)),
        "ppo/mean_scores": float(scores.mean()),
        "ppo/std_scores": float(scores.std()) if bs > 1 else 0.0,
        "env/reward_mean": float(raw_scores.mean()),
        "env/reward_std": float(raw_scores.std()) if bs > 1 else 0.0,
        "tokens/queries_len_mean": float(query_lens.mean()),
        "tokens/responses_len_mean": float(response_lens.mean()),
        "tokens/responses_len_std": float(response_lens.std()) if bs > 1 else 0.0,
        "tokens/empty_rate": float((response_lens <= 1).float().mean()),
        "ppo/early_stop": float(optimisation.early_stop),
        "skipped": 0.0,
    }
    for k, v in _stack_mean(optimisation.minibatch_stats).items():
        stats[f"ppo/{k}"] = v
    stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"] \
        if stats["ppo/returns/var"] else float("nan")
    stats["ppo/learning_rate"] = float(learning_rate)
    return stats


def _stack_mean(dicts: list[dict]) -> dict:
    return {k: float(torch.stack([torch.as_tensor(d[k], dtype=torch.float64) for d in dicts]).mean()) for k in dicts[0]}


def _skipped_stats(kl_ctl, raw_scores, responses, reason: str, t0: float) -> dict[str, float]:
    finite = raw_scores[torch.isfinite(raw_scores)]
    return {
        "skipped": 1.0,
        "skip_reason": reason,
        "objective/kl_coef": float(kl_ctl.value),
        "env/reward_mean": float(finite.mean()) if finite.numel() else float("nan"),
        "tokens/responses_len_mean": float(sum(r.numel() for r in responses) / max(len(responses), 1)),
        "time/ppo/total": time.time() - t0,
    }
