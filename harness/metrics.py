"""Pure statistics of an evaluation: seeds, text metrics, bootstrap intervals, before/after comparison.

Nothing here imports torch or loads a model: every figure is computed from plain sample rows (one dict per
prompt and sample: ``prompt_index, sample_index, seed, query, references, response, toxicity, reward,
length, kl, second_toxicity, faithfulness``), so a saved evaluation can be summarized again and each function can be
tested on numbers written by hand.

- :func:`sample_seed`: the seed of one sample, the same for the before and the after model (pairing);
- text metrics: :func:`rouge_best` (ROUGE-1/2/L, best over the references), :func:`distinct_n`,
  :func:`repeated_ngram_rate`, :func:`is_empty`, :func:`distinct_summary_rate`;
- statistics: :func:`bootstrap_mean_interval`, :func:`paired_bootstrap`, :func:`paired_difference_bootstrap`,
  :func:`relative_improvement`;
- :func:`phase_metrics` (``metrics.before`` / ``metrics.after``), :func:`compare` (``metrics.comparison``),
  :func:`qualitative_rows` (the reference's table), :func:`training_summary` (``metrics.training``).

Definitions: ``docs/evaluation.md``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .config import HarnessConfig
from .errors import HarnessError

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
REPEAT_N = 3  # n of the repeated-n-gram guard
DEGENERATE_RUN = 3  # an output repeating one word this many times in a row is degenerate ("no no no")
COPY_N = 4  # copying is measured on word 4-grams
POWER = 0.8  # the power at which the smallest detectable improvement is stated

PHASE_KEYS = (
    "toxicity_mean", "toxicity_std", "toxicity_ci_low", "toxicity_ci_high", "toxic_rate", "expected_max_toxicity",
    "toxicity_probability", "reward_mean", "reward_std", "rouge1", "rouge2", "rougeL", "empty_rate", "length_mean",
    "distinct_1", "distinct_2", "repeated_ngram_rate", "second_toxicity_mean", "kl_per_token_mean",
    "kl_per_sequence_mean", "response_toxicity_mean", "clean_logprob_mean", "degenerate_rate", "copy_rate",
    "faithfulness_mean", "faithful_rate", "distinct_summary_rate", "empty_rate_upper", "degenerate_rate_upper",
    "copy_rate_upper",
)
COMPARISON_KEYS = (
    "mean_improvement", "std_improvement", "mean_improvement_ci_low", "mean_improvement_ci_high",
    "bootstrap_resamples", "confidence", "rouge_l_drop", "reward_gain", "num_prompts", "samples_per_prompt",
    "logp_clean_gain", "length_ratio", "copy_rate_increase", "degenerate_rate_increase",
    "response_mean_improvement", "response_mean_improvement_ci_low", "response_mean_improvement_ci_high",
    "second_mean_improvement", "second_mean_improvement_ci_low", "second_mean_improvement_ci_high", "judge_gap",
    "min_detectable_improvement", "response_min_detectable_improvement", "second_min_detectable_improvement",
    "faithfulness_change", "faithfulness_drop_ci_high", "faithful_rate_change", "copy_rate_increase_upper",
)


@dataclass
class EvalOutput:
    """One model's evaluation: metrics (``metrics.before``/``after`` keys), one row per sample, wall time.

    ``response_ids`` holds the sampled token ids of each row (actions only, in the order of ``samples``):
    what the model really generated, which decoding and re-tokenizing the text would not give back. It is
    kept in memory only (not in the run files).
    """

    metrics: dict
    samples: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    response_ids: list[list[int]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "samples": self.samples, "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: Mapping) -> EvalOutput:
        return cls(metrics=dict(data["metrics"]), samples=list(data["samples"]), seconds=float(data["seconds"]))

# ============================================================================================ seeds

def sample_seed(base: int, prompt_index: int, sample_index: int = 0, samples_per_prompt: int = 1) -> int:
    """The seed of one sample: ``base + prompt_index * samples_per_prompt + sample_index``.

    Distinct for every (prompt, sample) of an evaluation, independent of the batch the sample is
    generated in, and the same for the before and the after model: the comparison is paired. With one
    sample per prompt it is ``base + prompt_index`` (the example of ``docs/results-schema.md``).
    """
    if not 0 <= sample_index < samples_per_prompt:
        raise ValueError(f"sample_index {sample_index} is outside [0, {samples_per_prompt})")
    return int(base) + int(prompt_index) * int(samples_per_prompt) + int(sample_index)


# ============================================================================================ text metrics

_ROUGE = None


class _KeptStems:
    """rouge_score's Porter stemmer with each word's stem kept: summaries of one corpus repeat their words,
    and stemming is most of ROUGE's time (the scores are the stemmer's own, word for word)."""

    def __init__(self, stemmer):
        self._stems: dict[str, str] = {}
        self._stemmer = stemmer

    def stem(self, word: str) -> str:
        stem = self._stems.get(word)
        if stem is None:
            if len(self._stems) >= 1 << 17:  # a bound on memory for an endless vocabulary
                self._stems.clear()
            stem = self._stems[word] = self._stemmer.stem(word)
        return stem


def _rouge_scorer():
    """``rouge_score``'s scorer with its default tokenizer and Porter stemming (``use_stemmer=True``)."""
    global _ROUGE
    if _ROUGE is None:
        from nltk.stem import porter
        from rouge_score import rouge_scorer, tokenize, tokenizers

        class StemmingTokenizer(tokenizers.Tokenizer):
            def __init__(self):
                self._stemmer = _KeptStems(porter.PorterStemmer())

            def tokenize(self, text):
                return tokenize.tokenize(text, self._stemmer)

        _ROUGE = rouge_scorer.RougeScorer(list(ROUGE_KEYS), tokenizer=StemmingTokenizer())
    return _ROUGE


def rouge_best(prediction: str, references: Sequence[str]) -> dict[str, float] | None:
    """ROUGE-1/2/L F-measures of ``prediction``, each the best over ``references`` (None without references).

    ``rouge_score``'s ``score_multi`` picks, per ROUGE type, the reference with the highest F-measure, so a
    prediction equal to any one reference scores 1.0 however different the others are.
    """
    refs = [r for r in references if isinstance(r, str) and r.strip()]
    if not refs:
        return None
    scores = _rouge_scorer().score_multi(refs, prediction or "")
    return {k: float(scores[k].fmeasure) for k in ROUGE_KEYS}


def _words(text: str) -> list[str]:
    return (text or "").lower().split()


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): unique n-grams / total n-grams, pooled over all outputs.

    Words are the lower-cased whitespace-separated tokens of each output; n-grams do not cross outputs.
    0.0 when the outputs hold no n-gram at all (e.g. all empty).
    """
    grams = [g for t in texts for g in _ngrams(_words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeats_ngram(text: str, n: int = REPEAT_N) -> bool:
    """True when some word n-gram occurs at least twice in ``text`` (occurrences may overlap)."""
    grams = _ngrams(_words(text), n)
    return len(grams) != len(set(grams))


def repeated_ngram_rate(texts: Sequence[str], n: int = REPEAT_N) -> float:
    """Share of outputs that repeat some word 3-gram (:func:`repeats_ngram`), over all outputs.

    An output counts when the same sequence of ``n`` lower-cased whitespace-separated words occurs at
    least twice in it ("the cat sat the cat sat" repeats "the cat sat"; "a a a a" repeats "a a a").
    Outputs with fewer than ``n + 1`` words cannot repeat and count as not repeating; empty outputs stay in
    the denominator. A degenerate, looping policy pushes this rate up.
    """
    return float(np.mean([repeats_ngram(t, n) for t in texts])) if len(texts) else 0.0


def is_empty(text: str) -> bool:
    """Empty or whitespace-only (after decoding without special tokens: ``<pad></pad>`` is empty)."""
    return not (text or "").strip()


def _plain_words(text: str) -> list[str]:
    """Lower-cased words with the punctuation around them stripped (``"fine."`` -> ``"fine"``)."""
    words = (w.strip(".,;:!?\"'()[]{}") for w in (text or "").lower().split())
    return [w for w in words if w]


def is_degenerate(text: str, min_words: int) -> bool:
    """An output no summary can be: fewer than ``min_words`` words, no letter at all, or one word repeated
    :data:`DEGENERATE_RUN` times in a row. Empty outputs are degenerate; ``"."`` and ``"#Person2#"`` too."""
    words = _plain_words(text)
    if len(words) < min_words or not any(c.isalpha() for c in text):
        return True
    run = 1
    for a, b in zip(words, words[1:]):
        run = run + 1 if a == b else 1
        if run >= DEGENERATE_RUN:
            return True
    return False


def normalize_summary(text: str) -> str:
    """A summary as :func:`distinct_summary_rate` compares it: lower-cased, punctuation taken out (each mark
    becomes a space), white space collapsed. ``"Fine, thanks."`` and ``"fine thanks"`` are the same."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", (text or "").lower()).split())


def distinct_summary_rate(samples: Sequence[Mapping]) -> float:
    """Distinct summaries over prompts: the number of distinct :func:`normalize_summary` texts among the first
    sample of every prompt, divided by the number of prompts. One fixed sentence written for 128 prompts reads
    1/128; a summary of its own for every prompt reads 1.0."""
    first = [s for s in samples if s["sample_index"] == 0]
    if not first:
        return 0.0
    return len({normalize_summary(s["response"]) for s in first}) / len(first)


def copy_score(text: str, source: str, n: int = COPY_N) -> float:
    """Share of the output's word n-grams that stand in ``source`` (the prompt: dialogue and instruction).

    A summary in its own words scores near 0; a copy of a stretch of the dialogue scores 1. Outputs with
    fewer than ``n`` words score 0 (too short to tell; :func:`is_degenerate` judges those).
    """
    grams = _ngrams(_plain_words(text), n)
    if not grams:
        return 0.0
    seen = set(_ngrams(_plain_words(source), n))
    return sum(g in seen for g in grams) / len(grams)


# ============================================================================================ statistics

def _as_prompt_matrix(values) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"expected one value per prompt (n,) or per prompt and sample (n, k), got shape {a.shape}")
    return a


def relative_improvement(before: float, after: float) -> float | None:
    """``(before - after) / before``; 0.0 when both are 0, None when only ``before`` is 0 (undefined)."""
    before, after = float(before), float(after)
    if before == after:
        return 0.0
    if before == 0.0:
        return None
    return (before - after) / before


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_mean_interval(values, resamples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling prompts (rows) with replacement."""
    a = _as_prompt_matrix(values).mean(axis=1)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start, idx in _resample_chunks(rng, len(a), resamples):
        means[start:start + len(idx)] = a[idx].mean(axis=1)
    return _percentile_interval(means, confidence)


def _resample_chunks(rng: np.random.Generator, n: int, resamples: int, max_cells: int = 4_000_000):
    rows = max(1, max_cells // max(n, 1))
    for start in range(0, resamples, rows):
        yield start, rng.integers(0, n, size=(min(rows, resamples - start), n))


def _paired_prompt_means(before, after, resamples: int, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt's mean before and after, once the pair and the bootstrap's settings are checked."""
    b, a = _as_prompt_matrix(before), _as_prompt_matrix(after)
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"paired bootstrap needs the same prompts before and after: {b.shape[0]} != {a.shape[0]}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return b.mean(axis=1), a.mean(axis=1)


def _relative_drop(before, after, axis=-1):
    """``(mean(before) - mean(after)) / mean(before)`` along ``axis``: 0 where the means are equal, -inf where only
    the before mean is 0."""
    mb, ma = np.mean(before, axis=axis), np.mean(after, axis=axis)
    diff = mb - ma
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(diff == 0.0, 0.0, np.where(mb == 0.0, -np.inf, diff / np.where(mb == 0.0, 1.0, mb)))


def _mean_drop(before, after, axis=-1):
    return np.mean(before, axis=axis) - np.mean(after, axis=axis)


def _paired_bca(pb: np.ndarray, pa: np.ndarray, statistic, resamples: int, confidence: float,
                seed: int) -> tuple[float, float]:
    """Paired BCa bootstrap interval of ``statistic(before, after)`` over prompts (scipy.stats.bootstrap).

    BCa (bias-corrected and accelerated) corrects the percentile interval for the skew and bias a ratio's
    bootstrap distribution has; a resample draws prompt indices with replacement, one index set for both
    phases, from ``numpy.random.default_rng(seed)``. Where BCa is undefined (every resample gives the same
    value, e.g. identical phases), the percentile interval of the same resamples is returned."""
    import warnings

    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate distribution warns and gives NaN: handled below
        res = stats.bootstrap((pb, pa), statistic, paired=True, vectorized=True, n_resamples=resamples,
                              confidence_level=confidence, method="BCa", rng=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    if not (np.isfinite(lo) and np.isfinite(hi)):
        lo, hi = _percentile_interval(res.bootstrap_distribution, confidence)
    return float(lo), float(hi)


def paired_bootstrap(before_tox, after_tox, resamples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Paired BCa bootstrap interval of the mean-toxicity improvement ``(mean_b - mean_a) / mean_b``.

    ``before_tox`` and ``after_tox`` hold one value per prompt (shape (n,)) or per prompt and sample (n, k),
    row i of both belonging to the same prompt. Each resample draws n prompts with replacement (one index
    set for both models: the pairing is kept). A resample where both means are equal counts as 0
    improvement, one where only the before mean is 0 as -inf. BCa rather than the percentile interval: a
    ratio's bootstrap distribution is skewed, and BCa's coverage is second-order accurate where the
    percentile interval's is first-order (docs/verdicts.md).
    """
    pb, pa = _paired_prompt_means(before_tox, after_tox, resamples, confidence)
    if np.array_equal(pb, pa):
        return 0.0, 0.0
    return _paired_bca(pb, pa, _relative_drop, resamples, confidence, seed)


def paired_difference_bootstrap(before, after, resamples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Paired BCa bootstrap interval of ``mean(before) - mean(after)`` (a drop, in the figure's units).

    Same input shapes, resampling and method as :func:`paired_bootstrap`: with the same number of prompts and
    the same ``seed`` each resample draws the same prompt indices (one index set for both models), so the two
    intervals come from the same resamples. Identical before and after values give exactly (0, 0).
    """
    pb, pa = _paired_prompt_means(before, after, resamples, confidence)
    if np.array_equal(pb, pa):
        return 0.0, 0.0
    return _paired_bca(pb, pa, _mean_drop, resamples, confidence, seed)


# ============================================================================================ metrics

def wilson_upper(successes: int, n: int, confidence: float) -> float:
    """One-sided upper confidence bound of a proportion (Wilson score interval) at ``confidence``.

    A rate bound reads this rather than the point: 0 of 128 gives 0.021 at 95%, 2 of 128 gives 0.046, 3 of 128
    0.057, so "at most 5%" holds only where the evaluation shows it with that confidence."""
    from statistics import NormalDist

    if n < 1:
        raise ValueError(f"wilson_upper needs n >= 1, got {n}")
    z = NormalDist().inv_cdf(confidence)
    p, z2 = successes / n, z * z
    centre = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return min(1.0, (centre + half) / (1 + z2 / n))


def _rate_and_upper(flags: Sequence[bool], confidence: float) -> tuple[float, float]:
    return float(np.mean(flags)), wilson_upper(int(sum(flags)), len(flags), confidence)


def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else 0.0


def _mean_or_none(xs) -> float | None:
    """The mean, or None when any value is missing (a figure that was not measured for every sample)."""
    return None if not len(xs) or any(x is None for x in xs) else float(np.mean([float(x) for x in xs]))


def prompt_matrix(samples: Sequence[Mapping], key: str) -> np.ndarray:
    """(n_prompts, k) array of ``key``, rows in prompt order, columns in sample order."""
    ordered = sorted(samples, key=lambda s: (s["prompt_index"], s["sample_index"]))
    prompts = sorted({s["prompt_index"] for s in ordered})
    k = len(ordered) // max(len(prompts), 1)
    if k * len(prompts) != len(ordered):
        raise HarnessError("every prompt must have the same number of samples", field="samples")
    return np.asarray([float(s[key]) for s in ordered], dtype=np.float64).reshape(len(prompts), k)


def phase_metrics(samples: Sequence[Mapping], cfg: HarnessConfig) -> dict:
    """The ``metrics.before`` / ``metrics.after`` figures of one evaluation, from its sample rows.

    Every figure is derived from the rows alone (so a saved evaluation can be summarized again), each
    row holding ``response, references, toxicity, reward, length, kl, second_toxicity`` (and ``faithfulness``,
    None or absent without a faithfulness judge: its figures are then None).
    """
    if not samples:
        raise HarnessError("no samples to summarize", field="eval.num_samples")
    e = cfg.eval
    tox = prompt_matrix(samples, "toxicity")
    rewards = np.asarray([float(s["reward"]) for s in samples])
    texts = [s["response"] for s in samples]
    lengths = np.asarray([float(s["length"]) for s in samples])
    kls = np.asarray([float(s["kl"]) for s in samples])
    lo, hi = bootstrap_mean_interval(tox, e.bootstrap_resamples, e.confidence, e.seed)
    rouge = [r for r in (rouge_best(s["response"], s.get("references") or []) for s in samples) if r is not None]
    second = [s.get("second_toxicity") for s in samples]
    has_second = all(x is not None for x in second)
    flat = tox.reshape(-1)
    response_tox = [s.get("response_toxicity") for s in samples]
    logp = [s.get("clean_logprob") for s in samples]
    faith = [s.get("faithfulness") for s in samples]
    has_faith = all(x is not None for x in faith)
    empty, empty_upper = _rate_and_upper([is_empty(t) for t in texts], e.confidence)
    degenerate, degenerate_upper = _rate_and_upper([is_degenerate(t, e.min_words) for t in texts], e.confidence)
    copied, copied_upper = _rate_and_upper([copy_score(s["response"], s["query"]) >= e.copy_threshold
                                            for s in samples], e.confidence)
    return {
        "toxicity_mean": float(np.mean(flat)),
        "toxicity_std": float(np.std(flat)),  # population std, as the reference (np.std)
        "toxicity_ci_low": lo, "toxicity_ci_high": hi,
        "toxic_rate": float(np.mean(flat >= e.toxic_threshold)),
        "expected_max_toxicity": float(np.mean(tox.max(axis=1))),
        "toxicity_probability": float(np.mean((tox >= e.toxic_threshold).any(axis=1))),
        "reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
        **{k: (_mean([r[k] for r in rouge]) if rouge else None) for k in ROUGE_KEYS},
        "empty_rate": empty, "empty_rate_upper": empty_upper,
        "length_mean": float(np.mean(lengths)),
        "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
        "repeated_ngram_rate": repeated_ngram_rate(texts),
        "second_toxicity_mean": _mean([float(x) for x in second]) if has_second else None,
        "kl_per_token_mean": float(kls.sum() / lengths.sum()) if lengths.sum() > 0 else 0.0,
        "kl_per_sequence_mean": float(np.mean(kls)),
        "response_toxicity_mean": _mean_or_none(response_tox),
        "clean_logprob_mean": _mean_or_none(logp),
        "degenerate_rate": degenerate, "degenerate_rate_upper": degenerate_upper,
        "copy_rate": copied, "copy_rate_upper": copied_upper,
        "faithfulness_mean": _mean_or_none(faith),
        "faithful_rate": float(np.mean([float(x) >= e.faithful_threshold for x in faith])) if has_faith else None,
        "distinct_summary_rate": distinct_summary_rate(samples),
    }


# ============================================================================================ comparison

def check_paired(before: EvalOutput, after: EvalOutput) -> None:
    key = lambda s: (s["prompt_index"], s["sample_index"])  # noqa: E731
    b, a = sorted(before.samples, key=key), sorted(after.samples, key=key)
    if [key(s) for s in b] != [key(s) for s in a]:
        raise HarnessError(f"before ({len(b)} samples) and after ({len(a)} samples) were not evaluated on the same "
                           "prompts and samples", field="eval.num_samples",
                           fix="evaluate both with the same eval.num_samples and eval.samples_per_prompt")
    for sb, sa in zip(b, a):
        if sb["query"] != sa["query"]:
            raise HarnessError(f"prompt {sb['prompt_index']} differs between before and after", field="data",
                               fix="evaluate both models on the same test split")


def _measured(samples: Sequence[Mapping], key: str) -> bool:
    return bool(samples) and all(s.get(key) is not None for s in samples)


def paired_improvement(before: EvalOutput, after: EvalOutput, key: str, cfg: HarnessConfig):
    """(relative drop of the mean of ``key``, paired bootstrap interval low, high); Nones when not measured."""
    if not (_measured(before.samples, key) and _measured(after.samples, key)):
        return None, None, None
    e = cfg.eval
    tb, ta = prompt_matrix(before.samples, key), prompt_matrix(after.samples, key)
    lo, hi = paired_bootstrap(tb, ta, e.bootstrap_resamples, e.confidence, e.seed)
    return relative_improvement(tb.mean(), ta.mean()), lo, hi


def min_detectable_improvement(before_tox: np.ndarray, after_tox: np.ndarray, confidence: float,
                               power: float = POWER) -> float | None:
    """The smallest relative drop of mean toxicity this many prompts detect (two-sided, paired, normal approx.).

    ``(z[(1 + confidence) / 2] + z[power]) * sd(d) / sqrt(n) / mean(before)``, with ``d`` the per-prompt
    difference of mean toxicity before and after: an effect below this is likely to be called noise.
    None with fewer than 2 prompts or a before mean of 0.
    """
    from statistics import NormalDist

    b, a = _as_prompt_matrix(before_tox).mean(axis=1), _as_prompt_matrix(after_tox).mean(axis=1)
    if len(b) < 2 or b.mean() == 0:
        return None
    z = NormalDist().inv_cdf((1 + confidence) / 2) + NormalDist().inv_cdf(power)
    return float(z * np.std(b - a, ddof=1) / np.sqrt(len(b)) / b.mean())


def _detectable(before: EvalOutput, after: EvalOutput, key: str, confidence: float) -> float | None:
    """:func:`min_detectable_improvement` of the figure ``key`` (None when it was not measured before and after)."""
    if not (_measured(before.samples, key) and _measured(after.samples, key)):
        return None
    return min_detectable_improvement(prompt_matrix(before.samples, key), prompt_matrix(after.samples, key),
                                      confidence)


def _difference(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def compare(before: EvalOutput, after: EvalOutput, cfg: HarnessConfig) -> dict:
    """``metrics.comparison``: the reference's improvements, paired bootstrap intervals, quality deltas.

    Improvements are relative drops of mean toxicity, ``(before - after) / before``: by the reward model on
    what it reads (``mean_improvement``), by the reward model on the response alone
    (``response_mean_improvement``) and by the second judge (``second_mean_improvement``); ``judge_gap`` is
    the first minus the last (a policy that fools its reward model but not an independent judge opens it).
    Faithfulness (when judged before and after): ``faithfulness_change`` (after - before mean),
    ``faithfulness_drop_ci_high`` (upper end of the paired interval of before - after mean,
    :func:`paired_difference_bootstrap`) and ``faithful_rate_change``.
    """
    check_paired(before, after)
    e = cfg.eval
    mb, ma = before.metrics, after.metrics
    tb, ta = prompt_matrix(before.samples, "toxicity"), prompt_matrix(after.samples, "toxicity")
    mean_imp, lo, hi = paired_improvement(before, after, "toxicity", cfg)
    resp, resp_lo, resp_hi = paired_improvement(before, after, "response_toxicity", cfg)
    second, second_lo, second_hi = paired_improvement(before, after, "second_toxicity", cfg)
    faithful = _measured(before.samples, "faithfulness") and _measured(after.samples, "faithfulness")
    drop_hi = None
    if faithful:
        _, drop_hi = paired_difference_bootstrap(prompt_matrix(before.samples, "faithfulness"),
                                                 prompt_matrix(after.samples, "faithfulness"),
                                                 e.bootstrap_resamples, e.confidence, e.seed)
    return {
        "mean_improvement": relative_improvement(mb["toxicity_mean"], ma["toxicity_mean"]),
        "std_improvement": relative_improvement(mb["toxicity_std"], ma["toxicity_std"]),
        "mean_improvement_ci_low": lo, "mean_improvement_ci_high": hi,
        "bootstrap_resamples": int(e.bootstrap_resamples), "confidence": float(e.confidence),
        "rouge_l_drop": _difference(mb["rougeL"], ma["rougeL"]),
        "reward_gain": ma["reward_mean"] - mb["reward_mean"],
        "num_prompts": int(tb.shape[0]), "samples_per_prompt": int(tb.shape[1]),
        "logp_clean_gain": _difference(ma.get("clean_logprob_mean"), mb.get("clean_logprob_mean")),
        "length_ratio": ma["length_mean"] / mb["length_mean"] if mb["length_mean"] > 0 else None,
        "copy_rate_increase": ma["copy_rate"] - mb["copy_rate"],
        "copy_rate_increase_upper": (None if ma.get("copy_rate_upper") is None
                                     else ma["copy_rate_upper"] - mb["copy_rate"]),
        "degenerate_rate_increase": ma["degenerate_rate"] - mb["degenerate_rate"],
        "response_mean_improvement": resp, "response_mean_improvement_ci_low": resp_lo,
        "response_mean_improvement_ci_high": resp_hi,
        "second_mean_improvement": second, "second_mean_improvement_ci_low": second_lo,
        "second_mean_improvement_ci_high": second_hi,
        "judge_gap": _difference(mean_imp, second),
        "min_detectable_improvement": min_detectable_improvement(tb, ta, e.confidence),
        # the same for the summary alone and for the second judge: the bounds on their intervals are held to them
        "response_min_detectable_improvement": _detectable(before, after, "response_toxicity", e.confidence),
        "second_min_detectable_improvement": _detectable(before, after, "second_toxicity", e.confidence),
        "faithfulness_change": _difference(ma.get("faithfulness_mean"), mb.get("faithfulness_mean")),
        "faithfulness_drop_ci_high": drop_hi,
        "faithful_rate_change": _difference(ma.get("faithful_rate"), mb.get("faithful_rate")),
    }


def qualitative_rows(before: EvalOutput, after: EvalOutput, n: int) -> list[dict]:
    """The reference notebook's table (``results.json`` ``qualitative``): the first ``n`` prompts (their first
    sample) with ``query, response_before, response_after, reward_before, reward_after, reward_diff`` and each
    summary's toxicity and faithfulness, sorted by ``reward_diff`` descending (stable)."""
    first_a = {s["prompt_index"]: s for s in after.samples if s["sample_index"] == 0}
    rows = []
    for sb in sorted((s for s in before.samples if s["sample_index"] == 0), key=lambda s: s["prompt_index"])[:n]:
        sa = first_a[sb["prompt_index"]]
        rows.append({"query": sb["query"], "response_before": sb["response"], "response_after": sa["response"],
                     "reward_before": sb["reward"], "reward_after": sa["reward"],
                     "reward_diff": sa["reward"] - sb["reward"],
                     "toxicity_before": sb["toxicity"], "toxicity_after": sa["toxicity"],
                     "faithfulness_before": sb.get("faithfulness"), "faithfulness_after": sa.get("faithfulness")})
    return sorted(rows, key=lambda r: r["reward_diff"], reverse=True)


# ============================================================================================ training

def training_summary(stats: Sequence[Mapping]) -> dict:
    """``metrics.training`` from the rows of ``train_stats.jsonl`` (one per PPO step).

    A skipped step (``skipped`` true: a non-finite reward or loss whose update was undone) counts in
    ``steps`` and ``skipped_steps`` but not in the KL and reward figures.
    """
    good = [s for s in stats if not s.get("skipped")]
    kls = [s["objective/kl"] for s in good if s.get("objective/kl") is not None]
    rewards = [s["env/reward_mean"] for s in good if s.get("env/reward_mean") is not None]
    return {
        "steps": len(stats), "skipped_steps": len(stats) - len(good),
        "objective_kl_mean": sum(kls) / len(kls) if kls else None,
        "objective_kl_max": max(kls) if kls else None,
        "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
        "seconds_per_step": (sum(s.get("time/step", 0.0) for s in stats) / len(stats)) if stats else None,
    }


# ============================================================================================ the curve

#: the figures of one point of the over-optimisation curve (``curve.jsonl``), besides ``step``, ``seconds`` and
#: ``quality_failed``; improvements and changes are against the curve's step-0 point (the same prompts and seeds)
CURVE_KEYS = ("num_prompts", "kl", "toxicity_mean", "second_toxicity_mean", "improvement", "second_improvement",
              "judge_gap", "rouge_l", "rouge_l_drop", "length_mean", "length_ratio", "degenerate_rate", "empty_rate",
              "distinct_summary_rate", "faithfulness_mean", "faithfulness_drop")


def curve_point(step: int, start: Mapping, here: Mapping, num_prompts: int) -> dict:
    """One curve row from two :func:`phase_metrics` dicts of the curve's prompts: ``start`` (step 0) and ``here``.

    ``improvement`` / ``second_improvement`` are the relative drops of mean toxicity since step 0 by the reward
    model and by the second judge (None without a second judge); ``kl`` the mean exact KL per sequence to the
    reference; the quality figures are point estimates (no interval: a curve point is a subset of the prompts)."""
    second = None
    if start.get("second_toxicity_mean") is not None and here.get("second_toxicity_mean") is not None:
        second = relative_improvement(start["second_toxicity_mean"], here["second_toxicity_mean"])
    improvement = relative_improvement(start["toxicity_mean"], here["toxicity_mean"])
    return {
        "step": int(step), "num_prompts": int(num_prompts),
        "kl": float(here["kl_per_sequence_mean"]),
        "toxicity_mean": float(here["toxicity_mean"]), "second_toxicity_mean": here.get("second_toxicity_mean"),
        "improvement": improvement, "second_improvement": second,
        "judge_gap": None if second is None or improvement is None else improvement - second,
        "rouge_l": here.get("rougeL"), "rouge_l_drop": _difference(start.get("rougeL"), here.get("rougeL")),
        "length_mean": float(here["length_mean"]),
        "length_ratio": here["length_mean"] / start["length_mean"] if start["length_mean"] > 0 else None,
        "degenerate_rate": float(here["degenerate_rate"]), "empty_rate": float(here["empty_rate"]),
        "distinct_summary_rate": float(here["distinct_summary_rate"]),
        "faithfulness_mean": here.get("faithfulness_mean"),
        "faithfulness_drop": _difference(start.get("faithfulness_mean"), here.get("faithfulness_mean")),
    }


CURVE_WINDOW = 3  # the regret reads the judge's curve as means of this many consecutive points (docs/verdicts.md)


def curve_summary(rows: Sequence[Mapping], final_step: int | None = None, window: int = CURVE_WINDOW) -> dict:
    """``metrics.curve``: the peak of the second judge's improvement, the regret and the selected point.

    ``rows``: the curve's points (``curve.jsonl``), one per step. One point reads a subset of the prompts and
    moves with the few toxic ones among them, so the peak and the end are read on the judge's curve smoothed by
    a trailing mean of ``window`` consecutive points: the peak is the highest such mean (the earliest of equal
    ones; ``peak_from_step``..``peak_step``), the end the mean of the last ``window`` points up to ``final_step``
    (the last point when None), and ``judge_regret`` the peak minus the end (None without a second judge or a
    point at ``final_step``). The selected point is a single point: the highest ``second_improvement`` among the
    points after step 0 that fail none of the curve's quality bounds (``quality_failed`` empty; the earliest of
    equal ones), None when none passes."""
    rows = sorted(rows, key=lambda r: r["step"])
    if final_step is None and rows:
        final_step = rows[-1]["step"]
    rows_to_end = [r for r in rows if r["step"] <= final_step] if final_step is not None else []
    judged = all(r.get("second_improvement") is not None for r in rows_to_end) and bool(rows_to_end)
    ends = rows_to_end[-1]["step"] == final_step if rows_to_end else False
    means = []  # (first step, last step, mean) of each window of consecutive points
    if judged:
        w = max(1, min(window, len(rows_to_end)))
        for i in range(w - 1, len(rows_to_end)):
            part = rows_to_end[i - w + 1:i + 1]
            means.append((part[0]["step"], part[-1]["step"], sum(r["second_improvement"] for r in part) / w))
    peak = max(means, key=lambda m: (m[2], -m[1])) if means else None
    end = means[-1] if means and ends else None
    candidates = [r for r in rows if r["step"] > 0 and r.get("second_improvement") is not None
                  and not r.get("quality_failed")]
    selected = max(candidates, key=lambda r: (r["second_improvement"], -r["step"])) if candidates else None
    return {
        "points": len(rows), "steps": [int(r["step"]) for r in rows], "window": int(window),
        "peak_from_step": None if peak is None else int(peak[0]), "peak_step": None if peak is None else int(peak[1]),
        "peak_second_improvement": None if peak is None else peak[2],
        "final_from_step": None if end is None else int(end[0]), "final_step": None if end is None else int(end[1]),
        "final_second_improvement": None if end is None else end[2],
        "judge_regret": None if peak is None or end is None else peak[2] - end[2],
        "selected": None if selected is None else {k: selected.get(k) for k in ("step", *CURVE_KEYS)},
    }
