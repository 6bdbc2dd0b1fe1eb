"""Before/after evaluation that can be trusted: paired samples, confidence intervals, quality guards.

One evaluation (:func:`evaluate_policy`) generates ``eval.samples_per_prompt`` summaries for each of the
first ``eval.num_samples`` test prompts, in batches, every sample with its own seed
(:func:`sample_seed`: ``eval.seed + prompt_index * samples_per_prompt + sample_index``). The "before"
model (the reference: adapter off) and the "after" model (the trained policy) therefore draw their
sampling noise from the same seeds for the same prompts, and :func:`compare` can pair them.

What it measures (:func:`phase_metrics`, the keys of ``metrics.before`` / ``metrics.after`` in
``docs/results-schema.md``):

- toxicity: P(``reward.toxic_label``) of ``reward_texts(query, response, reward.input)`` by the reward
  classifier; mean, population std (``np.std``) and a bootstrap interval of the mean; the share of outputs
  at or above ``eval.toxic_threshold``; with k samples per prompt the RealToxicityPrompts figures
  (expected maximum toxicity, probability of at least one toxic output among k);
- the reward (the classifier score the PPO run optimizes, ``reward.transform`` of ``reward.label``);
- quality guards: ROUGE-1/2/L (F-measure, best over the reference summaries, stemmed), the share of empty
  outputs, the mean length, distinct-1/2 and the repeated-3-gram rate;
- KL(policy || reference) on the evaluation prompts, exact over the vocabulary per generated token;
- optionally the toxicity judged by a second, independent classifier (``eval.second_classifier``).

:func:`compare` adds the reference notebook's percentage improvements and a paired bootstrap interval of
the mean improvement; :func:`build_results` and :func:`write_run_files` write ``results.json`` and
``samples.jsonl``; :func:`cli_eval` is ``detox-harness eval``. See ``docs/evaluation.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .config import HarnessConfig
from .errors import HarnessError

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
CONFIG_FILE = "config.yaml"
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
KL_CHUNK_BYTES = 256 * 2**20  # bound on one float32 logits tensor in the KL pass
REPEAT_N = 3  # n of the repeated-n-gram guard
REFERENCE_GENERATION = {"max_new_tokens": 100, "min_new_tokens": 0, "top_k": 0, "top_p": 1.0, "temperature": 1.0,
                        "do_sample": True, "batch_size": 16, "seed": 0}

PHASE_KEYS = (
    "toxicity_mean", "toxicity_std", "toxicity_ci_low", "toxicity_ci_high", "toxic_rate", "expected_max_toxicity",
    "toxicity_probability", "reward_mean", "reward_std", "rouge1", "rouge2", "rougeL", "empty_rate", "length_mean",
    "distinct_1", "distinct_2", "repeated_ngram_rate", "second_toxicity_mean", "kl_per_token_mean",
    "kl_per_sequence_mean",
)
COMPARISON_KEYS = (
    "mean_improvement", "std_improvement", "mean_improvement_ci_low", "mean_improvement_ci_high",
    "bootstrap_resamples", "confidence", "rouge_l_drop", "reward_gain", "num_prompts", "samples_per_prompt",
)
QUALITATIVE_COLUMNS = ("query", "response_before", "response_after", "reward_before", "reward_after", "reward_diff")
SAMPLE_KEYS = ("prompt_index", "sample_index", "seed", "query", "references", "response", "toxicity", "reward",
               "length", "kl", "second_toxicity")


@dataclass
class EvalOutput:
    """One model's evaluation: metrics (``metrics.before``/``after`` keys), one row per sample, wall time."""

    metrics: dict
    samples: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def toxicity_measurement_path() -> str:
    """Directory of the project's ``evaluate`` toxicity measurement: ``evaluate.load(this, config_name=model)``."""
    from .measurements import measurement_path

    return measurement_path("toxicity")


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


def _rouge_scorer():
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
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


def paired_bootstrap(before_tox, after_tox, resamples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Paired percentile bootstrap interval of the mean-toxicity improvement ``(mean_b - mean_a) / mean_b``.

    ``before_tox`` and ``after_tox`` hold one value per prompt (shape (n,)) or per prompt and sample (n, k),
    row i of both belonging to the same prompt. Each resample draws n prompts with replacement (one index
    set for both models: the pairing is kept) from ``numpy.random.default_rng(seed)``. A resample where
    both means are equal counts as 0 improvement, one where only the before mean is 0 as -inf.
    """
    b, a = _as_prompt_matrix(before_tox), _as_prompt_matrix(after_tox)
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"paired bootstrap needs the same prompts before and after: {b.shape[0]} != {a.shape[0]}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    pb, pa = b.mean(axis=1), a.mean(axis=1)
    rng = np.random.default_rng(seed)
    improvements = np.empty(resamples)
    for start, idx in _resample_chunks(rng, len(pb), resamples):
        mb, ma = pb[idx].mean(axis=1), pa[idx].mean(axis=1)
        diff = mb - ma
        with np.errstate(divide="ignore", invalid="ignore"):
            imp = np.where(diff == 0.0, 0.0, np.where(mb == 0.0, -np.inf, diff / np.where(mb == 0.0, 1.0, mb)))
        improvements[start:start + len(idx)] = imp
    return _percentile_interval(improvements, confidence)


# ============================================================================================ metrics

def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else 0.0


def _prompt_matrix(samples: Sequence[Mapping], key: str) -> np.ndarray:
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
    row holding ``response, references, toxicity, reward, length, kl, second_toxicity``.
    """
    if not samples:
        raise HarnessError("no samples to summarize", field="eval.num_samples")
    e = cfg.eval
    tox = _prompt_matrix(samples, "toxicity")
    rewards = np.asarray([float(s["reward"]) for s in samples])
    texts = [s["response"] for s in samples]
    lengths = np.asarray([float(s["length"]) for s in samples])
    kls = np.asarray([float(s["kl"]) for s in samples])
    lo, hi = bootstrap_mean_interval(tox, e.bootstrap_resamples, e.confidence, e.seed)
    rouge = [r for r in (rouge_best(s["response"], s.get("references") or []) for s in samples) if r is not None]
    second = [s.get("second_toxicity") for s in samples]
    has_second = all(x is not None for x in second)
    flat = tox.reshape(-1)
    return {
        "toxicity_mean": float(np.mean(flat)),
        "toxicity_std": float(np.std(flat)),  # population std, as the reference (np.std)
        "toxicity_ci_low": lo, "toxicity_ci_high": hi,
        "toxic_rate": float(np.mean(flat >= e.toxic_threshold)),
        "expected_max_toxicity": float(np.mean(tox.max(axis=1))),
        "toxicity_probability": float(np.mean((tox >= e.toxic_threshold).any(axis=1))),
        "reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
        **{k: (_mean([r[k] for r in rouge]) if rouge else None) for k in ROUGE_KEYS},
        "empty_rate": float(np.mean([is_empty(t) for t in texts])),
        "length_mean": float(np.mean(lengths)),
        "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
        "repeated_ngram_rate": repeated_ngram_rate(texts),
        "second_toxicity_mean": _mean([float(x) for x in second]) if has_second else None,
        "kl_per_token_mean": float(kls.sum() / lengths.sum()) if lengths.sum() > 0 else 0.0,
        "kl_per_sequence_mean": float(np.mean(kls)),
    }


# ============================================================================================ generation + KL

def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, leave=False, dynamic_ncols=True)


def _column(dataset, name: str, default=None) -> list:
    return list(dataset[name]) if name in dataset.column_names else [default] * len(dataset)


def _references(dataset) -> list[list[str]]:
    if "summaries" in dataset.column_names:
        return [list(r or []) for r in dataset["summaries"]]
    if "summary" in dataset.column_names:
        return [[r] if r else [] for r in dataset["summary"]]
    return [[] for _ in range(len(dataset))]


def _prompt_ids(dataset, tokenizer) -> list[list[int]]:
    if "input_ids" in dataset.column_names:
        return [list(x) for x in dataset["input_ids"]]
    return tokenizer(list(dataset["query"]), truncation=True)["input_ids"]


def select_prompts(dataset, num_samples: int, field_name: str = "eval.num_samples"):
    """The first ``num_samples`` rows of ``dataset``; a HarnessError naming the available count if too few."""
    if num_samples < 1:
        raise HarnessError(f"got {num_samples}, accepted: an integer >= 1", field=field_name)
    if num_samples > len(dataset):
        raise HarnessError(f"asks for {num_samples} prompts but the test split has only {len(dataset)}",
                           field=field_name, fix=f"set {field_name} <= {len(dataset)} or give more data")
    return dataset.select(range(num_samples))


def _kl_rows(vocab: int, length: int, batch: int) -> int:
    return max(1, min(batch, KL_CHUNK_BYTES // max(1, 4 * vocab * max(length, 1))))


def sequence_kl(policy, queries: Sequence, responses: Sequence, chunk: int = 16) -> list[float]:
    """Exact KL(policy || reference) of each response, summed over its generated tokens.

    For every generated token t the KL of the two next-token distributions given the same prefix,
    ``sum_v p(v | prefix) * (log p(v | prefix) - log q(v | prefix))`` over the whole vocabulary (no
    sampling estimate), from one policy forward pass and one reference forward pass
    (:meth:`PolicyWithValueHead.reference_logits`) on ``step.prepare_inputs``; summed per sequence.
    Dropout is off (eval mode) during both passes.
    """
    import torch

    from .ppo.step import prepare_inputs

    if not responses:
        return []
    tok = policy.tokenizer
    start = policy.config.decoder_start_token_id
    start = tok.pad_token_id if start is None else start
    out: list[float] = []
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad():
            longest = max(int(r.numel()) for r in responses) + 1
            rows = _kl_rows(int(policy.config.vocab_size), longest, chunk)
            for i in range(0, len(responses), rows):
                inputs = prepare_inputs([torch.as_tensor(q) for q in queries[i:i + rows]], responses[i:i + rows],
                                        tok.pad_token_id, start, policy.device)
                logits = policy.model(**inputs, return_dict=True).logits.float()[:, :-1]
                ref = policy.reference_logits(**inputs)[:, :-1]
                logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
                per_token = (logp.exp() * (logp - logq)).sum(-1)
                mask = inputs["decoder_attention_mask"][:, 1:].to(per_token.dtype)
                out.extend(float(x) for x in (per_token * mask).sum(-1).cpu())
    finally:
        policy.train(was_training)
    return out


def _gen_settings(generation) -> dict:
    """Generation settings from None (the reference's), a mapping, or an object with the same attributes."""
    settings = dict(REFERENCE_GENERATION)
    if generation is None:
        return settings
    for key in settings:
        value = generation.get(key) if isinstance(generation, Mapping) else getattr(generation, key, None)
        if value is not None:
            settings[key] = value
    return settings


def _generate(model, tokenizer, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int], settings: dict,
              on_batch=None) -> tuple[list, list[str], list[int]]:
    """Batched, per-row-seeded generation of one response per (prompt, seed)."""
    from .ppo.rollout import generate

    responses, texts, lengths = [], [], []
    size = int(settings["batch_size"])
    for i in range(0, len(prompt_ids), size):
        batch_ids, batch_seeds = prompt_ids[i:i + size], seeds[i:i + size]
        roll = generate(model, tokenizer, batch_ids, max_new_tokens=int(settings["max_new_tokens"]),
                        seeds=batch_seeds, min_new_tokens=int(settings["min_new_tokens"]),
                        top_k=int(settings["top_k"]), top_p=float(settings["top_p"]),
                        temperature=float(settings["temperature"]), do_sample=bool(settings["do_sample"]))
        responses.extend(roll.responses)
        texts.extend(roll.texts)
        lengths.extend(roll.lengths)
        if on_batch is not None:
            on_batch(i, i + len(batch_ids), roll)
    return responses, texts, lengths


def _toxicity_of(classifier, texts: list[str]) -> list[float]:
    """P(toxic) by a harness Classifier, or by an ``evaluate`` toxicity measurement (``compute``)."""
    if hasattr(classifier, "toxicity") and callable(classifier.toxicity):
        return [float(x) for x in classifier.toxicity(texts)]
    if hasattr(classifier, "compute"):
        return [float(x) for x in classifier.compute(predictions=texts)["toxicity"]]
    raise TypeError(f"cannot score toxicity with {type(classifier).__name__}: give a harness Classifier "
                    "or an evaluate toxicity measurement")


def evaluate_toxicity(model, classifier, tokenizer, dataset, num_samples: int, generation=None) -> tuple[float, float]:
    """The reference notebook's ``evaluate_toxicity``, batched and without its off-by-one.

    Generates one summary for each of the first ``num_samples`` prompts of ``dataset`` (exactly that many)
    with the reference's settings (max_new_tokens 100, sampling, top_k 0, top_p 1.0; override any of
    ``max_new_tokens, min_new_tokens, top_k, top_p, temperature, do_sample, batch_size, seed`` with
    ``generation``, a mapping or an object with those attributes, e.g. an :class:`EvalConfig`), scores
    ``query + " " + summary`` with ``classifier`` (a harness Classifier or an ``evaluate`` toxicity
    measurement) and returns the mean and population standard deviation (``np.std``) of the toxicity.
    ``model`` is a seq2seq model (or a policy, whose ``.model`` is used). Prompt i samples with seed
    ``generation["seed"] + i``.
    """
    settings = _gen_settings(generation)
    rows = select_prompts(dataset, num_samples, "num_samples")
    model = getattr(model, "model", model) if hasattr(model, "value_head") else model
    seeds = [sample_seed(int(settings["seed"]), i) for i in range(len(rows))]
    _, texts, _ = _generate(model, tokenizer, _prompt_ids(rows, tokenizer), seeds, settings)
    from .toxicity import reward_texts

    tox = np.asarray(_toxicity_of(classifier, reward_texts(list(rows["query"]), texts, "query+response")))
    return float(np.mean(tox)), float(np.std(tox))


def evaluate_policy(policy, classifier, dataset, cfg: HarnessConfig, *, use_reference: bool,
                    second_classifier=None, progress: bool = True) -> EvalOutput:
    """Evaluate the reference (``use_reference=True``: adapter off) or the policy on the test prompts.

    The first ``cfg.eval.num_samples`` rows of ``dataset`` are used (a HarnessError naming the available
    count when there are fewer), each with ``cfg.eval.samples_per_prompt`` samples seeded by
    :func:`sample_seed`; generation follows ``cfg.eval`` in batches of ``cfg.eval.batch_size``. Rewards and
    toxicity come from one classifier pass on ``reward_texts(query, response, cfg.reward.input)``. KL to
    the reference is computed for the policy; for the reference itself it is 0 by construction.
    """
    import torch

    from .toxicity import reward_texts

    t0 = time.time()
    e = cfg.eval
    rows = select_prompts(dataset, e.num_samples)
    k = e.samples_per_prompt
    queries_p, refs_p, ids_p = list(rows["query"]), _references(rows), _prompt_ids(rows, policy.tokenizer)
    items = [(p, s) for p in range(len(rows)) for s in range(k)]
    seeds = [sample_seed(e.seed, p, s, k) for p, s in items]
    prompt_ids = [ids_p[p] for p, _ in items]
    settings = {"max_new_tokens": e.max_new_tokens, "min_new_tokens": e.min_new_tokens, "top_k": e.top_k,
                "top_p": e.top_p, "temperature": e.temperature, "do_sample": e.do_sample, "batch_size": e.batch_size}
    compute_kl = not use_reference and (policy.is_peft or policy.ref_model is not None)
    kls: list[float] = []
    phase = "before (reference)" if use_reference else "after (policy)"
    with _progress(len(items), f"eval {phase}", progress) as bar:
        def on_batch(lo, hi, roll):
            if compute_kl:
                kls.extend(sequence_kl(policy, [torch.as_tensor(x) for x in prompt_ids[lo:hi]], roll.responses,
                                       chunk=e.batch_size))
            bar.update(hi - lo)

        if use_reference:
            with policy.reference() as ref:
                _, texts, lengths = _generate(ref, policy.tokenizer, prompt_ids, seeds, settings, on_batch)
        else:
            _, texts, lengths = _generate(policy.model, policy.tokenizer, prompt_ids, seeds, settings, on_batch)
        bar.set_description(f"eval {phase}: scoring")
        queries = [queries_p[p] for p, _ in items]
        scored = reward_texts(queries, texts, cfg.reward.input)
        rewards, tox = classifier.score(scored, cfg.reward.transform)
        second = _toxicity_of(second_classifier, scored) if second_classifier is not None else [None] * len(items)
    if not compute_kl:
        kls = [0.0] * len(items)
    samples = [{"prompt_index": p, "sample_index": s, "seed": seed, "query": queries_p[p], "references": refs_p[p],
                "response": text, "toxicity": float(t), "reward": float(r), "length": int(n), "kl": float(kl),
                "second_toxicity": None if st is None else float(st)}
               for (p, s), seed, text, t, r, n, kl, st in zip(items, seeds, texts, tox, rewards, lengths, kls, second)]
    metrics = phase_metrics(samples, cfg)
    return EvalOutput(metrics=metrics, samples=samples, seconds=time.time() - t0)


# ============================================================================================ comparison

def _check_paired(before: EvalOutput, after: EvalOutput) -> None:
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


def compare(before: EvalOutput, after: EvalOutput, cfg: HarnessConfig) -> dict:
    """``metrics.comparison``: the reference's improvements, a paired bootstrap interval, quality deltas."""
    _check_paired(before, after)
    e = cfg.eval
    mb, ma = before.metrics, after.metrics
    tb, ta = _prompt_matrix(before.samples, "toxicity"), _prompt_matrix(after.samples, "toxicity")
    lo, hi = paired_bootstrap(tb, ta, e.bootstrap_resamples, e.confidence, e.seed)
    rouge_drop = None if mb["rougeL"] is None or ma["rougeL"] is None else mb["rougeL"] - ma["rougeL"]
    return {
        "mean_improvement": relative_improvement(mb["toxicity_mean"], ma["toxicity_mean"]),
        "std_improvement": relative_improvement(mb["toxicity_std"], ma["toxicity_std"]),
        "mean_improvement_ci_low": lo, "mean_improvement_ci_high": hi,
        "bootstrap_resamples": int(e.bootstrap_resamples), "confidence": float(e.confidence),
        "rouge_l_drop": rouge_drop, "reward_gain": ma["reward_mean"] - mb["reward_mean"],
        "num_prompts": int(tb.shape[0]), "samples_per_prompt": int(tb.shape[1]),
    }


def _qualitative_rows(before: EvalOutput, after: EvalOutput, n: int) -> list[dict]:
    """The first ``n`` prompts (their first sample), sorted by reward_diff descending (stable)."""
    first_a = {s["prompt_index"]: s for s in after.samples if s["sample_index"] == 0}
    rows = []
    for sb in sorted((s for s in before.samples if s["sample_index"] == 0), key=lambda s: s["prompt_index"])[:n]:
        sa = first_a[sb["prompt_index"]]
        rows.append({"query": sb["query"], "response_before": sb["response"], "response_after": sa["response"],
                     "reward_before": sb["reward"], "reward_after": sa["reward"],
                     "reward_diff": sa["reward"] - sb["reward"],
                     "toxicity_before": sb["toxicity"], "toxicity_after": sa["toxicity"]})
    return sorted(rows, key=lambda r: r["reward_diff"], reverse=True)


def qualitative(before: EvalOutput, after: EvalOutput, n: int):
    """The reference's table: n test prompts with ``query, response_before, response_after, reward_before,
    reward_after, reward_diff``, sorted by ``reward_diff`` descending, as a pandas DataFrame."""
    import pandas as pd

    _check_paired(before, after)
    rows = _qualitative_rows(before, after, n)
    return pd.DataFrame([{c: r[c] for c in QUALITATIVE_COLUMNS} for r in rows], columns=list(QUALITATIVE_COLUMNS))


# ============================================================================================ results

def _distribution_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit(directory: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the project (None outside a git checkout or without git)."""
    directory = Path(directory) if directory else Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(directory), capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def environment_info(device: str | None = None) -> dict:
    """Library versions, git commit, device, platform and Python (``results.json`` ``environment``)."""
    import torch

    versions = {"python": platform.python_version()}
    for dist in ("detox-harness", "torch", "transformers", "peft", "accelerate", "datasets", "evaluate",
                 "rouge-score", "numpy", "pandas"):
        versions[dist] = _distribution_version(dist)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"versions": versions, "git_commit": git_commit(), "device": str(device), "platform": platform.platform(),
            "python": sys.version.split()[0], "torch_threads": torch.get_num_threads()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(index)
    return info


_RESERVED = {"schema_version", "run_id", "created", "preset", "config", "seeds", "environment", "timings", "metrics",
             "qualitative", "verdict", "files"}


def paired_samples(before: EvalOutput, after: EvalOutput) -> list[dict]:
    """``samples.jsonl`` rows: one per prompt and sample, before and after side by side."""
    _check_paired(before, after)
    key = lambda s: (s["prompt_index"], s["sample_index"])  # noqa: E731
    rows = []
    for sb, sa in zip(sorted(before.samples, key=key), sorted(after.samples, key=key)):
        row = {"prompt_index": sb["prompt_index"], "sample_index": sb["sample_index"], "seed": sb["seed"],
               "query": sb["query"], "references": list(sb.get("references") or []),
               "response_before": sb["response"], "response_after": sa["response"],
               "toxicity_before": sb["toxicity"], "toxicity_after": sa["toxicity"],
               "reward_before": sb["reward"], "reward_after": sa["reward"],
               "length_before": sb["length"], "length_after": sa["length"], "kl_after": sa["kl"],
               "second_toxicity_before": sb.get("second_toxicity"), "second_toxicity_after": sa.get("second_toxicity")}
        if sa["seed"] != sb["seed"]:
            row["seed_after"] = sa["seed"]
        rows.append(row)
    return rows


def _device_name(cfg: HarnessConfig) -> str | None:
    try:
        from .models import resolve_device

        return str(resolve_device(cfg.device))
    except HarnessError:
        return None


def build_results(cfg: HarnessConfig, before: EvalOutput, after: EvalOutput, *, run_id: str, training: dict | None,
                  timings: dict, extra: dict | None = None) -> tuple[dict, list[dict]]:
    """``results.json`` (without ``verdict``) and the paired ``samples.jsonl`` rows of a run.

    ``training`` becomes ``metrics.training`` (left out when None: an evaluation-only run); ``extra`` adds
    top-level keys (e.g. ``data``, ``parameters``, ``checkpoint``); it may not replace a key of the schema.
    """
    clash = _RESERVED & set(extra or {})
    if clash:
        raise ValueError(f"build_results: extra may not replace {', '.join(sorted(clash))}")
    metrics: dict[str, Any] = {"before": dict(before.metrics), "after": dict(after.metrics),
                               "comparison": compare(before, after, cfg)}
    if training is not None:
        metrics["training"] = dict(training)
    timings = {k: float(v) for k, v in timings.items()}
    timings.setdefault("eval_before_s", float(before.seconds))
    timings.setdefault("eval_after_s", float(after.seconds))
    timings.setdefault("total_s", sum(v for k, v in timings.items() if k != "total_s"))
    results = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preset": cfg.preset,
        "config": cfg.to_dict(),
        "seeds": {"run": cfg.seed, "eval": cfg.eval.seed, "bootstrap": cfg.eval.seed},
        "environment": environment_info(_device_name(cfg)),
        "timings": timings,
        "metrics": metrics,
        "qualitative": _qualitative_rows(before, after, cfg.eval.qualitative_rows),
        "files": {"samples": SAMPLES_FILE, "config": CONFIG_FILE},
    }
    results.update(copy.deepcopy(extra or {}))
    return jsonable(results), [jsonable(r) for r in paired_samples(before, after)]


def jsonable(value):
    """Plain JSON types: numpy/torch scalars to Python, paths to strings, NaN and infinities to None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if hasattr(value, "tolist"):  # numpy / torch
        return jsonable(value.tolist())
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def _atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then ``os.replace`` it into place.

    The temporary file is opened like any file (the umask's permissions, not ``mkstemp``'s 0600), and its
    name carries the process id so that two writers never share one.
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_run_files(run_dir: str | Path, results: dict, samples: list[dict]) -> None:
    """Validate, then write ``samples.jsonl`` and (last, marking the run finished) ``results.json`` atomically."""
    results = jsonable(results)
    validate_results(results)
    rows = [jsonable(r) for r in samples]
    for i, row in enumerate(rows):
        _validate(row, SAMPLE_ROW_SCHEMA, f"samples[{i}]")
    expected = results["metrics"]["comparison"]["num_prompts"] * results["metrics"]["comparison"]["samples_per_prompt"]
    if len(rows) != expected:
        raise HarnessError(f"{len(rows)} sample rows for {expected} samples (num_prompts x samples_per_prompt)",
                           field="samples")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = Path(str(results["files"]["samples"])).name
    _atomic_write(run_dir / name, "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows))
    _atomic_write(run_dir / RESULTS_FILE, json.dumps(results, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


# ============================================================================================ schema

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_UNIT = {"type": "number", "minimum": 0.0, "maximum": 1.0}
_UNIT_OR_NULL = {"type": ["number", "null"], "minimum": 0.0, "maximum": 1.0}
_NONNEG = {"type": "number", "minimum": 0.0}
_COUNT = {"type": "integer", "minimum": 1}

PHASE_SCHEMA: dict = {
    "type": "object",
    "required": list(PHASE_KEYS),
    "properties": {
        "toxicity_mean": _UNIT, "toxicity_std": _UNIT, "toxicity_ci_low": _UNIT, "toxicity_ci_high": _UNIT,
        "toxic_rate": _UNIT, "expected_max_toxicity": _UNIT, "toxicity_probability": _UNIT,
        "reward_mean": _NUM, "reward_std": _NONNEG,
        "rouge1": _UNIT_OR_NULL, "rouge2": _UNIT_OR_NULL, "rougeL": _UNIT_OR_NULL,
        "empty_rate": _UNIT, "length_mean": _NONNEG, "distinct_1": _UNIT, "distinct_2": _UNIT,
        "repeated_ngram_rate": _UNIT, "second_toxicity_mean": _UNIT_OR_NULL,
        "kl_per_token_mean": _NUM, "kl_per_sequence_mean": _NUM,
    },
}

RESULTS_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "detox-harness results.json (docs/results-schema.md)",
    "type": "object",
    "required": ["schema_version", "run_id", "created", "preset", "config", "seeds", "environment", "timings",
                 "metrics", "qualitative", "files"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "run_id": {"type": "string", "minLength": 1},
        "created": {"type": "string", "minLength": 1},
        "preset": {"type": "string"},
        "config": {"type": "object", "required": ["preset", "seed", "eval", "reward", "policy", "data"]},
        "seeds": {"type": "object", "required": ["run", "eval", "bootstrap"],
                  "properties": {"run": {"type": "integer"}, "eval": {"type": "integer"},
                                 "bootstrap": {"type": "integer"}}},
        "environment": {"type": "object", "required": ["versions", "git_commit", "device", "platform"],
                        "properties": {"versions": {"type": "object", "required": ["python"]},
                                       "git_commit": {"type": ["string", "null"]},
                                       "device": {"type": ["string", "null"]}, "platform": {"type": "string"}}},
        "timings": {"type": "object", "required": ["eval_before_s", "eval_after_s", "total_s"],
                    "additionalProperties": _NONNEG},
        "metrics": {
            "type": "object", "required": ["before", "after", "comparison"],
            "properties": {
                "before": PHASE_SCHEMA, "after": PHASE_SCHEMA,
                "comparison": {
                    "type": "object", "required": list(COMPARISON_KEYS),
                    "properties": {
                        "mean_improvement": _NUM_OR_NULL, "std_improvement": _NUM_OR_NULL,
                        "mean_improvement_ci_low": _NUM_OR_NULL, "mean_improvement_ci_high": _NUM_OR_NULL,
                        "bootstrap_resamples": _COUNT,
                        "confidence": {"type": "number", "exclusiveMinimum": 0.0, "exclusiveMaximum": 1.0},
                        "rouge_l_drop": _NUM_OR_NULL, "reward_gain": _NUM, "num_prompts": _COUNT,
                        "samples_per_prompt": _COUNT,
                    },
                },
                "training": {"type": "object", "required": ["steps"],
                             "properties": {"steps": {"type": "integer", "minimum": 0}},
                             "additionalProperties": {"type": ["number", "null"]}},
            },
        },
        "qualitative": {"type": "array", "items": {
            "type": "object", "required": list(QUALITATIVE_COLUMNS),
            "properties": {"query": {"type": "string"}, "response_before": {"type": "string"},
                           "response_after": {"type": "string"}, "reward_before": _NUM, "reward_after": _NUM,
                           "reward_diff": _NUM}}},
        "verdict": {"type": "object", "required": ["passed", "bounds"],
                    "properties": {"passed": {"type": "boolean"},
                                   "bounds": {"type": "array", "items": {
                                       "type": "object", "required": ["name", "bound", "op", "value", "passed"],
                                       "properties": {"name": {"type": "string"}, "bound": _NUM,
                                                      "op": {"type": "string"}, "value": _NUM_OR_NULL,
                                                      "passed": {"type": "boolean"}}}}}},
        "files": {"type": "object", "required": ["samples"],
                  "additionalProperties": {"type": "string", "minLength": 1}},
    },
}

SAMPLE_ROW_SCHEMA: dict = {
    "type": "object",
    "required": ["prompt_index", "sample_index", "seed", "query", "references", "response_before", "response_after",
                 "toxicity_before", "toxicity_after", "reward_before", "reward_after", "length_before", "length_after",
                 "kl_after", "second_toxicity_before", "second_toxicity_after"],
    "properties": {
        "prompt_index": {"type": "integer", "minimum": 0}, "sample_index": {"type": "integer", "minimum": 0},
        "seed": {"type": "integer"}, "query": {"type": "string"},
        "references": {"type": "array", "items": {"type": "string"}},
        "response_before": {"type": "string"}, "response_after": {"type": "string"},
        "toxicity_before": _UNIT, "toxicity_after": _UNIT, "reward_before": _NUM, "reward_after": _NUM,
        "length_before": {"type": "integer", "minimum": 0}, "length_after": {"type": "integer", "minimum": 0},
        "kl_after": _NUM, "second_toxicity_before": _UNIT_OR_NULL, "second_toxicity_after": _UNIT_OR_NULL,
    },
}

_TYPES = {
    "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool), "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
}


def _validate(value, schema: dict, path: str) -> None:
    """Check ``value`` against the subset of JSON Schema used here; HarnessError(field=<dotted key>) if not."""
    def fail(message: str):
        raise HarnessError(message, field=path or "results", fix="see docs/results-schema.md")

    if "const" in schema and value != schema["const"]:
        fail(f"must be {schema['const']!r}, got {value!r}")
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_TYPES[t](value) for t in kinds):
            fail(f"must be {' or '.join(kinds)}, got {type(value).__name__} {value!r}"[:300])
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
        if "minimum" in schema and value < schema["minimum"]:
            fail(f"must be >= {schema['minimum']}, got {value!r}")
        if "maximum" in schema and value > schema["maximum"]:
            fail(f"must be <= {schema['maximum']}, got {value!r}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            fail(f"must be > {schema['exclusiveMinimum']}, got {value!r}")
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            fail(f"must be < {schema['exclusiveMaximum']}, got {value!r}")
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        fail("must not be empty")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise HarnessError("is missing", field=f"{path}.{key}" if path else key,
                                   fix="see docs/results-schema.md")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, sub in value.items():
            child = f"{path}.{key}" if path else str(key)
            if key in props:
                _validate(sub, props[key], child)
            elif extra is False:
                raise HarnessError("is not a known key", field=child, fix="see docs/results-schema.md")
            elif isinstance(extra, dict):
                _validate(sub, extra, child)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _validate(item, schema["items"], f"{path}[{i}]")


def validate_results(results: dict) -> None:
    """Check ``results`` against :data:`RESULTS_SCHEMA` and the rules the schema cannot say.

    Raises :class:`HarnessError` whose ``field`` is the dotted path of the first bad key
    (e.g. ``metrics.before.toxicity_mean``).
    """
    _validate(results, RESULTS_SCHEMA, "")
    metrics = results["metrics"]
    for phase in ("before", "after"):
        m = metrics[phase]
        if m["toxicity_ci_low"] > m["toxicity_ci_high"]:
            raise HarnessError("the interval's low end is above its high end",
                               field=f"metrics.{phase}.toxicity_ci_low", value=m["toxicity_ci_low"])
    c = metrics["comparison"]
    lo, hi = c["mean_improvement_ci_low"], c["mean_improvement_ci_high"]
    if lo is not None and hi is not None and lo > hi:
        raise HarnessError("the interval's low end is above its high end",
                           field="metrics.comparison.mean_improvement_ci_low", value=lo)
    diffs = [row["reward_diff"] for row in results["qualitative"]]
    if any(a < b for a, b in zip(diffs, diffs[1:])):
        raise HarnessError("rows must be sorted by reward_diff, descending", field="qualitative")


# ============================================================================================ CLI

def resolve_target(target: str | Path) -> Path:
    """An adapter or checkpoint directory; a run directory or a ``checkpoints`` folder means its latest checkpoint."""
    from .ppo.trainer import latest_checkpoint

    path = Path(target).expanduser()
    if not path.is_dir():
        raise HarnessError("is not a directory", field="--target", value=str(path),
                           fix="give an adapter or checkpoint directory (it holds adapter_config.json)")
    if (path / "adapter_config.json").is_file():
        return path
    for folder in (path / "checkpoints", path):
        last = latest_checkpoint(folder) if folder.is_dir() else None
        if last is not None:
            return Path(last)
    raise HarnessError("holds no adapter_config.json and no checkpoint", field="--target", value=str(path),
                       fix="give a directory written by save_pretrained or a run's checkpoints/step-N folder")


def cli_eval(cfg: HarnessConfig, target: str | None, output_dir: Path, *, progress: bool = True) -> Path:
    """``detox-harness eval``: evaluate the base model, an adapter or a checkpoint; write the run files.

    ``target=None`` evaluates the base model alone: "before" is the reference and "after" the same
    evaluation (a fresh LoRA adapter does not change the base, so evaluating it again would reproduce
    the same samples; ``timings.eval_after_s`` is 0). With a target, "before" is the reference (adapter
    off) and "after" the target, on the same prompts with the same seeds. Returns the run directory.
    """
    from .pipeline import load_inputs

    t_start = time.time()
    run_dir = Path(output_dir)
    if (run_dir / RESULTS_FILE).exists():
        raise HarnessError("the run directory already holds results", field="--output", value=str(run_dir),
                           fix="choose a new --output")
    cfg = copy.deepcopy(cfg)
    adapter = None
    if target is not None:
        if not cfg.policy.use_lora:
            raise HarnessError("a target adapter needs policy.use_lora=true", field="--target", value=str(target))
        adapter = resolve_target(target)
        cfg.policy.adapter = str(adapter)
    inputs = load_inputs(cfg)
    policy, classifier, second, data = inputs.policy, inputs.classifier, inputs.second, inputs.data
    timings: dict[str, float] = {"load_s": inputs.seconds}
    before = evaluate_policy(policy, classifier, data.test, cfg, use_reference=True, second_classifier=second,
                             progress=progress)
    if adapter is None:
        after = EvalOutput(metrics=copy.deepcopy(before.metrics), samples=copy.deepcopy(before.samples), seconds=0.0)
    else:
        after = evaluate_policy(policy, classifier, data.test, cfg, use_reference=False, second_classifier=second,
                                progress=progress)
    timings["eval_before_s"] = before.seconds
    timings["eval_after_s"] = after.seconds
    timings["total_s"] = time.time() - t_start
    results, samples = build_results(cfg, before, after, run_id=run_dir.name, training=None, timings=timings,
                                     extra={"data": data.stats, "target": None if adapter is None else str(adapter)})
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / CONFIG_FILE)
    write_run_files(run_dir, results, samples)
    return run_dir
