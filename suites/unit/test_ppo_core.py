"""Property tests of ``harness/ppo/core.py``: every function against a plain numpy/python reference.

The whole PPO step is checked against TRL's numbers in ``test_parity.py``; this file checks each piece
of math alone, on random inputs (hypothesis), for the invariants that make it correct:

* masked statistics ignore whatever sits under ``mask == 0`` and equal numpy's on the unmasked part;
* GAE equals a reverse loop written here, and with lambda = 1 its returns are the discounted rewards-to-go;
* the KL estimators are >= 0 where they must be and 0 when policy and reference agree; ``full`` is the
  analytic KL;
* the clipped losses pass no gradient where they clip, and the right gradient where they do not;
* the KL controllers move the coefficient in the right direction and by the documented amount;
* per-token rewards, entropy, running moments and score transforms equal their definitions.

All math runs in float64 so that the references agree to rounding; the tolerances below are named.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from harness.ppo import core

# ------------------------------------------------------------------------------------ constants

MAX_EXAMPLES = 60  # per property: enough to hit edge shapes (B=1, T=1, holes in masks), fast (< 1 s each)
SETTINGS = settings(deadline=None, max_examples=MAX_EXAMPLES)
# float64 math against float64 references that sum in another order: agreement to ~1e-12 relative is
# rounding; 1e-9 leaves room for the amplification by 1/sqrt(var) in whitening, and catches any formula slip.
RTOL = 1e-9
ATOL = 1e-9
WHITEN_EPS = 1e-8  # the epsilon of TRL's masked_whiten: (x - mean) * rsqrt(var + 1e-8)
KL_PROPORTIONAL_CLIP = 0.2  # Ziegler et al. / TRL AdaptiveKLController: proportional error clipped to +-0.2
GARBAGE = 1e6  # magnitude of the finite junk written under mask == 0 (padded positions are finite logits)
MAX_B, MAX_T = 5, 9  # batch rows and response length drawn by the strategies
VALUE = 50.0  # magnitude of drawn values/rewards
GRAD_MARGIN = 0.05  # how far (relatively) a ratio / value prediction is placed outside its clip range
MIN_VAR = 1e-2  # whitening tests need a spread far above WHITEN_EPS: the whitened variance is 1 - eps/var
# whitened advantages: (x - mean) carries rounding ~1e-14 * |x| of a reverse sum over MAX_T terms, then is
# scaled by 1/sqrt(var) >= 1/sqrt(MIN_VAR)... 1e-6 absolute is orders above that and far below any slip
ADV_ATOL = 1e-6
SCORE_RTOL = 1e-5  # transform_scores works in float32 (the scores' dtype): ~1e-7 relative rounding, x100


def close(got, want, rtol: float = RTOL, atol: float = ATOL) -> bool:
    return np.allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------ strategies

finite = st.floats(-VALUE, VALUE, allow_nan=False, allow_infinity=False, allow_subnormal=False)
junk = st.floats(-GARBAGE, GARBAGE, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def masked_batch(draw, min_unmasked: int = 2, right_padded: bool = False):
    """(values, mask, junk) as float64 numpy arrays of one (B, T) shape, with >= min_unmasked ones in mask."""
    b = draw(st.integers(1, MAX_B))
    t = draw(st.integers(1, MAX_T))
    assume(b * t >= min_unmasked)
    values = np.array(draw(st.lists(finite, min_size=b * t, max_size=b * t)), dtype=np.float64).reshape(b, t)
    noise = np.array(draw(st.lists(junk, min_size=b * t, max_size=b * t)), dtype=np.float64).reshape(b, t)
    if right_padded:
        lengths = draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
        mask = (np.arange(t)[None, :] < np.array(lengths)[:, None]).astype(np.float64)
    else:
        mask = np.array(draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t)), dtype=np.float64).reshape(b, t)
    assume(mask.sum() >= min_unmasked)
    return values, mask, noise


def t64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def with_junk(values: np.ndarray, mask: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The same values on the unmasked part, junk under mask == 0."""
    return np.where(mask > 0, values, noise)


# ------------------------------------------------------------------------------------ masked stats

@SETTINGS
@given(masked_batch(min_unmasked=1))
def test_masked_mean_ignores_padding_and_matches_numpy(batch):
    values, mask, noise = batch
    want = values[mask > 0].mean()
    got = core.masked_mean(t64(values), t64(mask))
    got_junk = core.masked_mean(t64(with_junk(values, mask, noise)), t64(mask))
    assert close(got, want)
    assert float(got_junk) == float(got)


@SETTINGS
@given(masked_batch(min_unmasked=1))
def test_masked_mean_along_an_axis(batch):
    values, mask, noise = batch
    got = core.masked_mean(t64(with_junk(values, mask, noise)), t64(mask), axis=1).numpy()
    for i in range(values.shape[0]):
        row = values[i][mask[i] > 0]
        if row.size:
            assert close(got[i], row.mean())
        else:
            assert math.isnan(got[i])  # 0 / 0: an empty row has no mean


@SETTINGS
@given(masked_batch(min_unmasked=2), st.booleans())
def test_masked_var_ignores_padding_and_matches_numpy(batch, unbiased):
    values, mask, noise = batch
    want = values[mask > 0].var(ddof=1 if unbiased else 0)
    got = core.masked_var(t64(values), t64(mask), unbiased=unbiased)
    got_junk = core.masked_var(t64(with_junk(values, mask, noise)), t64(mask), unbiased=unbiased)
    assert close(got, want, atol=ATOL * VALUE ** 2)
    assert float(got_junk) == float(got)


def test_masked_var_needs_two_elements_for_bessel():
    with pytest.raises(ValueError, match="at least 2"):
        core.masked_var(t64([[1.0, 2.0]]), t64([[1.0, 0.0]]))
    assert float(core.masked_var(t64([[1.0, 2.0]]), t64([[1.0, 0.0]]), unbiased=False)) == 0.0


@SETTINGS
@given(masked_batch(min_unmasked=2), st.booleans())
def test_masked_whiten_ignores_padding_and_matches_numpy(batch, shift_mean):
    values, mask, noise = batch
    on = mask > 0
    x = values[on]
    want = (x - x.mean()) / np.sqrt(x.var(ddof=1) + WHITEN_EPS)
    if not shift_mean:
        want = want + x.mean()
    got = core.masked_whiten(t64(values), t64(mask), shift_mean=shift_mean).numpy()
    got_junk = core.masked_whiten(t64(with_junk(values, mask, noise)), t64(mask), shift_mean=shift_mean).numpy()
    # (x - mean) carries the rounding of the mean (~1e-16 * VALUE); rsqrt(var + eps) can scale it by 1/sqrt(eps)
    atol = ATOL + 1e-14 * VALUE / math.sqrt(WHITEN_EPS)
    assert close(got[on], want, atol=atol)
    assert np.array_equal(got_junk[on], got[on])


@SETTINGS
@given(masked_batch(min_unmasked=2))
def test_masked_whiten_gives_zero_mean_unit_variance(batch):
    values, mask, _ = batch
    x = values[mask > 0]
    assume(x.var(ddof=1) > MIN_VAR)
    w = core.masked_whiten(t64(values), t64(mask))
    assert close(core.masked_mean(w, t64(mask)), 0.0, atol=ADV_ATOL)
    assert close(core.masked_var(w, t64(mask)), 1.0, rtol=WHITEN_EPS / MIN_VAR + RTOL)


# ------------------------------------------------------------------------------------ log-probs, entropy

def _logits(draw, shape):
    n = int(np.prod(shape))
    flat = draw(st.lists(st.floats(-20, 20, allow_nan=False, allow_subnormal=False), min_size=n, max_size=n))
    return np.array(flat).reshape(shape)


@st.composite
def logits_batch(draw):
    b, t, v = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 7))
    labels = draw(st.lists(st.integers(0, v - 1), min_size=b * t, max_size=b * t))
    return _logits(draw, (b, t, v)), np.array(labels).reshape(b, t)


@st.composite
def logits_pair(draw):
    """Policy and reference logits of one (B, T, V) shape."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 7)))
    return _logits(draw, shape), _logits(draw, shape)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@SETTINGS
@given(logits_batch())
def test_logprobs_from_logits(batch):
    logits, labels = batch
    ref = np_log_softmax(logits)
    got = core.logprobs_from_logits(t64(logits), torch.as_tensor(labels)).numpy()
    want = np.take_along_axis(ref, labels[..., None], -1)[..., 0]
    assert close(got, want)
    full = core.logprobs_from_logits(t64(logits), None, gather=False).numpy()
    assert close(full, ref)
    assert close(np.exp(full).sum(-1), 1.0)


@SETTINGS
@given(logits_batch())
def test_token_logprobs_entropy_matches_categorical(batch):
    logits, labels = batch
    want = torch.distributions.Categorical(logits=t64(logits)).entropy()
    got = core.token_logprobs(t64(logits), torch.as_tensor(labels), entropy=True)[1]
    assert close(got, want)
    assert (got >= -ATOL).all() and (got <= math.log(logits.shape[-1]) + ATOL).all()


@SETTINGS
@given(logits_batch(), st.integers(0, 2 ** 31 - 1))
def test_token_logprobs_and_its_fused_backward_equal_autograds(batch, seed):
    logits, labels = batch
    labels = torch.as_tensor(labels)
    x = t64(logits).requires_grad_(True)
    lp, entropy = core.token_logprobs(x, labels, entropy=True)
    y = t64(logits).requires_grad_(True)
    want = torch.log_softmax(y, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    g = torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (lp * g).sum().backward()
    (want * g).sum().backward()
    assert close(lp.detach(), want.detach())
    assert close(x.grad, y.grad), "probabilities under exp(PROB_FLOOR) dropped: far below the tolerance"
    assert close(entropy, torch.distributions.Categorical(logits=t64(logits)).entropy())
    assert not entropy.requires_grad
    no_grad_lp, no_entropy = core.token_logprobs(t64(logits), labels)
    assert close(no_grad_lp, want.detach()) and no_entropy is None


def test_token_logprobs_gradient_holds_no_subnormal_float():
    """The regression it guards: autograd's gradient of a float32 log-softmax whose logits spread over a hundred
    nats is full of subnormal floats, and the language model head's backward matmul over them runs many times
    slower on a CPU."""
    g = torch.Generator().manual_seed(0)
    logits = torch.rand((2, 8, 4000), generator=g) * 200.0
    labels = torch.randint(0, 4000, (2, 8), generator=g)
    tiny = torch.finfo(torch.float32).tiny

    def subnormals(grad):
        return int(((grad != 0) & (grad.abs() < tiny)).sum())

    x = logits.clone().requires_grad_(True)
    (torch.log_softmax(x, -1).gather(-1, labels.unsqueeze(-1)) * 1e-3).sum().backward()
    assert subnormals(x.grad) > 0, "precondition: autograd's gradient has subnormals here"
    y = logits.clone().requires_grad_(True)
    (core.token_logprobs(y, labels)[0] * 1e-3).sum().backward()
    assert subnormals(y.grad) == 0
    assert torch.allclose(y.grad, x.grad, atol=1e-12)


def test_token_logprobs_backward_runs_once():
    x = torch.randn((2, 3, 5), requires_grad=True)
    total = core.token_logprobs(x, torch.zeros((2, 3), dtype=torch.long))[0].sum()
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        total.backward()


def test_a_banned_token_keeps_log_probs_and_entropy_finite():
    logits = torch.randn((2, 4, 6))
    logits[:, :2, 1] = torch.finfo(torch.float32).min  # the EOS ban of SampledDistribution
    lp, entropy = core.token_logprobs(logits.requires_grad_(True), torch.zeros((2, 4), dtype=torch.long), entropy=True)
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(entropy).all() and torch.isfinite(logits.grad).all()
    assert (logits.grad[:, :2, 1] == 0).all()


# ------------------------------------------------------------------------------------ KL estimators

logprob_pairs = st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.lists(st.floats(-30, 0, allow_subnormal=False), min_size=n, max_size=n),
    st.lists(st.floats(-30, 0, allow_subnormal=False), min_size=n, max_size=n)))


@SETTINGS
@given(logprob_pairs)
def test_sampled_kl_estimators(pair):
    lp, ref = t64(pair[0]), t64(pair[1])
    diff = np.array(pair[0]) - np.array(pair[1])
    assert close(core.kl_penalty(lp, ref, "kl"), diff)
    a = core.kl_penalty(lp, ref, "abs")
    m = core.kl_penalty(lp, ref, "mse")
    assert (a >= 0).all() and (m >= 0).all()
    assert close(a, np.abs(diff)) and close(m, 0.5 * diff ** 2)
    for kind in ("kl", "abs", "mse"):  # zero when policy and reference agree
        assert torch.equal(core.kl_penalty(lp, lp.clone(), kind), torch.zeros_like(lp))


@SETTINGS
@given(logits_pair())
def test_full_kl_is_the_analytic_kl(pair):
    p_logits, q_logits = pair
    logp, logq = np_log_softmax(p_logits), np_log_softmax(q_logits)
    want = (np.exp(logp) * (logp - logq)).sum(-1)  # KL(policy || reference) per position
    got = core.kl_penalty(t64(logp), t64(logq), "full")
    assert got.shape == p_logits.shape[:2]
    assert (got >= -ATOL).all()
    assert close(got, want)
    assert torch.equal(core.kl_penalty(t64(logp), t64(logp), "full"), torch.zeros(p_logits.shape[:2],
                                                                                  dtype=torch.float64))


def test_unknown_kl_estimator_is_refused():
    with pytest.raises(ValueError, match="unknown estimator"):
        core.kl_penalty(t64([0.0]), t64([0.0]), "bogus")
    assert set(core.KL_ESTIMATORS) == {"kl", "abs", "mse", "full"}


# ------------------------------------------------------------------------------------ KL controllers

@SETTINGS
@given(beta=st.floats(1e-3, 10), target=st.floats(0.1, 50), kl=st.floats(-10, 200), n=st.integers(0, 256),
       horizon=st.floats(1, 1e5))
def test_adaptive_controller_moves_by_the_documented_amount(beta, target, kl, n, horizon):
    ctl = core.AdaptiveKLController(beta, target, horizon)
    ctl.update(kl, n)
    error = min(max(kl / target - 1.0, -KL_PROPORTIONAL_CLIP), KL_PROPORTIONAL_CLIP)
    assert close(ctl.value, beta * (1.0 + error * n / horizon), rtol=1e-12, atol=0)
    # direction: up when the KL is above target, down below, still at target (or with n = 0)
    if n == 0 or kl == target:
        assert ctl.value == pytest.approx(beta, rel=1e-12)
    elif kl > target:
        assert ctl.value > beta
    else:
        assert ctl.value < beta
    # bounded step, whatever the KL
    assert abs(ctl.value / beta - 1.0) <= KL_PROPORTIONAL_CLIP * n / horizon + 1e-12


def test_adaptive_controller_state_round_trip_and_factory():
    ctl = core.make_kl_controller(True, 0.2, 6.0, 10_000)
    assert isinstance(ctl, core.AdaptiveKLController)
    ctl.update(30.0, 16)
    other = core.make_kl_controller(True, 1.0, 1.0, 1.0)
    other.load_state_dict(ctl.state_dict())
    assert (other.value, other.target, other.horizon) == (ctl.value, ctl.target, ctl.horizon)


@SETTINGS
@given(beta=st.floats(0, 10), kl=st.floats(-10, 200), n=st.integers(0, 256))
def test_fixed_controller_never_moves(beta, kl, n):
    ctl = core.make_kl_controller(False, beta, 6.0, 10_000)
    assert isinstance(ctl, core.FixedKLController)
    ctl.update(kl, n)
    assert ctl.value == beta
    restored = core.FixedKLController(99.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == beta


# ------------------------------------------------------------------------------------ rewards

@SETTINGS
@given(masked_batch(min_unmasked=0), st.floats(0, 5), st.data())
def test_compute_rewards_puts_the_score_on_the_last_token(batch, beta, data):
    kls, mask, _ = batch
    b, t = kls.shape
    scores = np.array(data.draw(st.lists(finite, min_size=b, max_size=b)))
    rewards, non_score = core.compute_rewards(t64(scores), t64(kls), t64(mask), beta)
    want = -beta * kls
    assert close(non_score, want)
    expected = want.copy()
    for i in range(b):
        on = np.flatnonzero(mask[i])
        if on.size:  # a row with no action gets no score
            expected[i, on[-1]] += scores[i]
    assert close(rewards, expected)


# ------------------------------------------------------------------------------------ GAE

def gae_reference(values: np.ndarray, rewards: np.ndarray, mask: np.ndarray, gamma: float, lam: float):
    """The plain reverse loop (cleanrl / TRL): values and rewards zeroed outside the mask, no bootstrap."""
    v, r = values * mask, rewards * mask
    b, t = v.shape
    adv = np.zeros((b, t))
    for i in range(b):
        last = 0.0
        for j in reversed(range(t)):
            next_v = v[i, j + 1] if j + 1 < t else 0.0
            delta = r[i, j] + gamma * next_v - v[i, j]
            last = delta + gamma * lam * last
            adv[i, j] = last
    return v, adv, adv + v


def np_whiten(x: np.ndarray, mask: np.ndarray, shift_mean: bool = True) -> np.ndarray:
    sel = x[mask > 0]
    out = (x - sel.mean()) / np.sqrt(sel.var(ddof=1) + WHITEN_EPS)
    return out if shift_mean else out + sel.mean()


gammas = st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0])
lams = st.sampled_from([0.0, 0.5, 0.95, 1.0])


@SETTINGS
@given(masked_batch(min_unmasked=2), st.data(), gammas, lams)
def test_compute_gae_equals_the_reverse_loop(batch, data, gamma, lam):
    values, mask, noise = batch
    rewards = np.array(data.draw(st.lists(finite, min_size=values.size, max_size=values.size))).reshape(values.shape)
    want_v, want_adv, want_ret = gae_reference(values, rewards, mask, gamma, lam)
    got_v, got_adv, got_ret = core.compute_gae(t64(values), t64(rewards), t64(mask), gamma, lam)
    on = mask > 0
    scale = max(1.0, np.abs(want_ret).max())
    assert close(got_v, want_v)
    assert close(got_ret[on], want_ret[on], atol=ATOL * scale * MAX_T)
    # the junk under mask == 0 changes nothing on the actions
    _, adv_j, ret_j = core.compute_gae(t64(with_junk(values, mask, noise)), t64(with_junk(rewards, mask, noise)),
                                       t64(mask), gamma, lam)
    assert close(ret_j[on], got_ret[on]) and close(adv_j[on], got_adv[on])
    assume(want_adv[on].var(ddof=1) > MIN_VAR)  # whitening a constant is all epsilon
    assert close(got_adv[on], np_whiten(want_adv, mask)[on], atol=ADV_ATOL)


@SETTINGS
@given(masked_batch(min_unmasked=2, right_padded=True), st.data(), gammas, lams, st.integers(1, 3))
def test_gae_does_not_depend_on_extra_padding(batch, data, gamma, lam, extra):
    """A response's returns do not change when the batch is padded further (e.g. a longer row elsewhere)."""
    values, mask, _ = batch
    rewards = np.array(data.draw(st.lists(finite, min_size=values.size, max_size=values.size))).reshape(values.shape)
    pad = np.zeros((values.shape[0], extra))
    _, adv, ret = core.compute_gae(t64(values), t64(rewards), t64(mask), gamma, lam)
    _, adv_p, ret_p = core.compute_gae(t64(np.hstack([values, pad])), t64(np.hstack([rewards, pad])),
                                       t64(np.hstack([mask, pad])), gamma, lam)
    on = mask > 0
    t = values.shape[1]
    assert close(ret_p[:, :t][on], ret[on]) and close(adv_p[:, :t][on], adv[on])


def test_whitened_rewards_stay_off_the_padding():
    values = np.array([[0.5, -0.2, 0.1], [0.3, 0.4, 0.0]])
    rewards = np.array([[1.0, -2.0, 3.0], [0.5, 4.0, 0.0]])
    mask = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    gamma, lam = 1.0, 0.95
    # reference: whiten the rewards over the actions, padding stays 0, then the plain loop
    whitened = np_whiten(rewards * mask, mask, shift_mean=False) * mask
    _, _, want_ret = gae_reference(values, whitened, mask, gamma, lam)
    _, _, got_ret = core.compute_gae(t64(values), t64(rewards), t64(mask), gamma, lam, whiten_rewards=True)
    on = mask > 0
    assert close(got_ret[on], want_ret[on])
    # the same batch padded by one more column must give the same returns on the actions
    pad = np.zeros((2, 1))
    _, _, padded_ret = core.compute_gae(t64(np.hstack([values, pad])), t64(np.hstack([rewards, pad])),
                                        t64(np.hstack([mask, pad])), gamma, lam, whiten_rewards=True)
    assert close(padded_ret[:, :3][on], got_ret[on])
    # TRL 0.11.4's leak, kept only for parity (TRLQuirks.leak_whitened_padding): the padded position's whitened reward
    # flows into the second row's returns, so they differ from the re-masked ones
    _, _, leaky = core.compute_gae(t64(values), t64(rewards), t64(mask), gamma, lam, whiten_rewards=True,
                                   mask_whitened=False)
    assert not close(leaky[1, :2], got_ret[1, :2])


@SETTINGS
@given(masked_batch(min_unmasked=2, right_padded=True), st.data(), gammas)
def test_gae_with_lambda_one_is_the_discounted_return(batch, data, gamma):
    """lambda = 1: advantage = discounted reward-to-go - value, so returns = reward-to-go (values cancel)."""
    values, mask, _ = batch
    rewards = np.array(data.draw(st.lists(finite, min_size=values.size, max_size=values.size))).reshape(values.shape)
    b, t = values.shape
    to_go = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            to_go[i, j] = sum(gamma ** (k - j) * rewards[i, k] * mask[i, k] for k in range(j, t))
    got_v, _, got_ret = core.compute_gae(t64(values), t64(rewards), t64(mask), gamma, 1.0)
    on = mask > 0
    scale = max(1.0, np.abs(to_go).max(), np.abs(values).max())
    raw_adv = (got_ret - got_v).numpy()
    assert close(raw_adv[on], (to_go - values)[on], atol=ATOL * scale * MAX_T)
    assert close(got_ret[on], to_go[on], atol=ATOL * scale * MAX_T)


# ------------------------------------------------------------------------------------ clipped losses

def test_clip_by_value_is_elementwise_clip():
    x = t64([-3.0, -1.0, 0.0, 2.0, 5.0])
    lo, hi = t64([-2.0, -2.0, 1.0, 0.0, 0.0]), t64([2.0, 2.0, 3.0, 1.0, 4.0])
    assert close(core.clip_by_value(x, lo, hi), np.clip(x.numpy(), lo.numpy(), hi.numpy()))


REGIONS = ("clipped", "unclipped_outside", "inside")


@st.composite
def policy_case(draw):
    """Per element: an advantage sign, a region relative to [1-eps, 1+eps], and a mask bit."""
    n = draw(st.integers(1, 10))
    eps = draw(st.floats(0.05, 0.5))
    adv, ratio, region, mask = [], [], [], []
    for _ in range(n):
        a = draw(st.floats(0.1, 10)) * draw(st.sampled_from([-1.0, 1.0]))
        where = draw(st.sampled_from(REGIONS))
        above = 1.0 + eps * (1 + GRAD_MARGIN) + draw(st.floats(0, 2))
        below = (1.0 - eps * (1 + GRAD_MARGIN)) * draw(st.floats(0.05, 1))
        inside = 1.0 + eps * (1 - GRAD_MARGIN) * draw(st.floats(-1, 1))
        if where == "inside":
            r = inside
        elif where == "clipped":  # A > 0 clips above (no more credit), A < 0 clips below
            r = above if a > 0 else below
        else:
            r = below if a > 0 else above
        adv.append(a), ratio.append(r), region.append(where), mask.append(draw(st.booleans()))
    assume(any(mask))
    return eps, np.array(adv), np.array(ratio), np.array(region), np.array(mask, dtype=np.float64)


@SETTINGS
@given(policy_case(), st.floats(-5, 0))
def test_policy_loss_has_no_gradient_where_it_clips(case, old):
    eps, adv, ratio, region, mask = case
    old_lp = torch.full((1, ratio.size), old, dtype=torch.float64)
    lp = (old_lp + t64(np.log(ratio))[None]).requires_grad_(True)
    loss, clipfrac, got_ratio = core.policy_loss(lp, old_lp, t64(adv)[None], t64(mask)[None], eps)
    loss.backward()
    grad = lp.grad[0].numpy()
    n = mask.sum()
    assert close(got_ratio[0].detach(), ratio, rtol=1e-12)
    want_loss = (np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)) * mask).sum() / n
    assert close(loss.detach(), want_loss)
    # d(-A * ratio)/d logprob = -A * ratio where the unclipped term is active, 0 where the clipped one is
    active = region != "clipped"
    assert close(grad, np.where(active, -adv * ratio * mask / n, 0.0))
    assert np.all(grad[(region == "clipped") | (mask == 0)] == 0.0)
    assert np.all(grad[active & (mask > 0)] != 0.0)
    assert close(clipfrac, ((region == "clipped") * mask).sum() / n)


@st.composite
def value_case(draw):
    n = draw(st.integers(1, 10))
    c = draw(st.floats(0.05, 1.0))
    old, vpred, ret, region, mask = [], [], [], [], []
    for _ in range(n):
        o = draw(st.floats(-5, 5))
        where = draw(st.sampled_from(REGIONS))
        sign = draw(st.sampled_from([-1.0, 1.0]))
        if where == "inside":
            v = o + sign * c * (1 - GRAD_MARGIN) * draw(st.floats(0, 1))
            r = v + draw(st.sampled_from([-1.0, 1.0])) * draw(st.floats(0.1, 5))
        else:
            v = o + sign * (c * (1 + GRAD_MARGIN) + draw(st.floats(0, 3)))
            edge = o + sign * c  # where the clipped prediction sits
            if where == "clipped":  # the return lies beyond v: the clipped prediction is further from it
                r = v + sign * draw(st.floats(0.1, 5))
            else:  # the return lies back toward old: the unclipped prediction is the worse one
                r = (v + edge) / 2 - sign * draw(st.floats(0.1, 5))
        old.append(o), vpred.append(v), ret.append(r), region.append(where), mask.append(draw(st.booleans()))
    assume(any(mask))
    return c, np.array(old), np.array(vpred), np.array(ret), np.array(region), np.array(mask, dtype=np.float64)


@SETTINGS
@given(value_case())
def test_value_loss_has_no_gradient_where_the_clipped_loss_wins(case):
    c, old, vpred, ret, region, mask = case
    v = t64(vpred)[None].clone().requires_grad_(True)
    loss, clipfrac = core.value_loss(v, t64(old)[None], t64(ret)[None], t64(mask)[None], c)
    loss.backward()
    grad = v.grad[0].numpy()
    n = mask.sum()
    clipped_v = np.clip(vpred, old - c, old + c)
    want_loss = 0.5 * (np.maximum((vpred - ret) ** 2, (clipped_v - ret) ** 2) * mask).sum() / n
    assert close(loss.detach(), want_loss)
    active = region != "clipped"
    assert close(grad, np.where(active, (vpred - ret) * mask / n, 0.0))
    assert np.all(grad[(region == "clipped") | (mask == 0)] == 0.0)
    assert np.all(grad[active & (mask > 0)] != 0.0)
    assert close(clipfrac, ((region == "clipped") * mask).sum() / n)


# ------------------------------------------------------------------------------------ scores

batches_of_scores = st.lists(st.lists(finite, min_size=2, max_size=12), min_size=1, max_size=5)


@SETTINGS
@given(batches_of_scores)
def test_running_moments_match_numpy_over_the_concatenation(batches):
    rm = core.RunningMoments()
    seen: list[float] = []
    for xs in batches:
        batch_mean, batch_std = rm.update(torch.tensor(xs, dtype=torch.float64))
        seen.extend(xs)
        arr = np.array(seen)
        scale = max(1.0, np.abs(arr).max())
        assert close(batch_mean, np.mean(xs), atol=ATOL * scale)
        assert close(batch_std, np.std(xs, ddof=1), atol=ATOL * scale)
        assert close(rm.mean, arr.mean(), atol=ATOL * scale)
        assert close(rm.std, arr.std(ddof=1), atol=ATOL * scale)
        assert close(rm.var, arr.var(ddof=0), atol=ATOL * scale ** 2)
    copy = core.RunningMoments()
    copy.load_state_dict(rm.state_dict())
    assert copy.state_dict() == rm.state_dict()


@SETTINGS
@given(st.lists(finite, min_size=2, max_size=16), st.floats(0.1, 10))
def test_transform_scores(xs, clip):
    x = torch.tensor(xs, dtype=torch.float32)
    # no option: the scores unchanged (as float32)
    assert torch.equal(core.transform_scores(x, None, False, False, None), x)
    # clipping only
    clipped = core.transform_scores(x, None, False, False, clip)
    assert torch.equal(clipped, torch.clamp(x, -clip, clip))
    assert (clipped.abs() <= clip).all()
    # scaling by the running std (after this batch), then normalisation, then clipping
    eps = torch.finfo(torch.float32).eps
    arr = np.array(xs, dtype=np.float32).astype(np.float64)
    std = arr.std(ddof=1)
    assume(std > MIN_VAR)
    scaled = core.transform_scores(x, core.RunningMoments(), True, False, None)
    assert close(scaled, arr / (std + eps), rtol=SCORE_RTOL, atol=SCORE_RTOL)
    normed = core.transform_scores(x, core.RunningMoments(), True, True, clip)
    assert close(normed, np.clip((arr - arr.mean()) / (std + eps), -clip, clip), rtol=SCORE_RTOL, atol=SCORE_RTOL)
    assert (normed.abs() <= clip).all()
