"""Before/after evaluation: generate on the test prompts with paired seeds, score, measure the exact KL.

One evaluation (:func:`evaluate_policy`) generates ``eval.samples_per_prompt`` summaries for each of the
first ``eval.num_samples`` test prompts, in batches, every sample with its own seed
(:func:`harness.metrics.sample_seed`: ``eval.seed + prompt_index * samples_per_prompt + sample_index``).
The "before" model (the reference: adapter off) and the "after" model (the trained policy) therefore draw
their sampling noise from the same seeds for the same prompts, and :func:`harness.metrics.compare` can
pair them.

Each sample is scored by the reward classifier on ``reward_texts(query, response, reward.input)`` (reward,
toxicity and log P(reward label) from one pass) and on the response alone, by the second judge (when
``eval.second_classifier`` is set), for faithfulness to its dialogue by the NLI judge (when
``eval.faithfulness_model`` is set: :mod:`harness.faithfulness`), and, for the policy, by the exact
KL(policy || reference) over the vocabulary per generated token (:func:`sequence_kl`). The figures of
``metrics.before`` / ``metrics.after`` are computed from those rows by :func:`harness.metrics.phase_metrics`.
See ``docs/evaluation.md``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .config import HarnessConfig
from .errors import HarnessError
from .metrics import EvalOutput, phase_metrics, sample_seed
from .parallel import SINGLE, Parallel

KL_CHUNK_BYTES = 256 * 2**20  # bound on one float32 logits tensor in the KL pass


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, leave=False, dynamic_ncols=True)


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


def select_prompts(dataset, num_samples: int | None, field_name: str = "eval.num_samples"):
    """The first ``num_samples`` rows of ``dataset`` (None: all); a HarnessError naming the count if too few."""
    if num_samples is None:
        num_samples = len(dataset)
    if num_samples < 1:
        raise HarnessError(f"got {num_samples}, accepted: an integer >= 1", field=field_name)
    if num_samples > len(dataset):
        raise HarnessError(f"asks for {num_samples} prompts but the test split has only {len(dataset)}",
                           field=field_name, fix=f"set {field_name} <= {len(dataset)} or give more data")
    return dataset.select(range(num_samples))


def _kl_rows(vocab: int, length: int, batch: int) -> int:
    return max(1, min(batch, KL_CHUNK_BYTES // max(1, 4 * vocab * max(length, 1))))


def sequence_kl(policy, queries: Sequence, responses: Sequence, chunk: int = 16, distribution=None) -> list[float]:
    """Exact KL(policy || reference) of each response, summed over its generated tokens.

    ``distribution`` (a :class:`harness.ppo.core.SampledDistribution`, the identity by default) is the one
    the responses were sampled from: both models' logits are read through it (temperature, EOS ban).

    For every generated token t the KL of the two next-token distributions given the same prefix,
    ``sum_v p(v | prefix) * (log p(v | prefix) - log q(v | prefix))`` over the whole vocabulary (no
    sampling estimate), from one policy forward pass and one reference forward pass
    (:meth:`PolicyWithValueHead.reference_logits`) on ``batch.prepare_inputs``; summed per sequence.
    Dropout is off (eval mode) during both passes.
    """
    import torch

    from .ppo.batch import prepare_inputs
    from .ppo.core import SampledDistribution

    distribution = distribution or SampledDistribution()
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
                logits = distribution.apply(policy.model(**inputs, return_dict=True).logits.float()[:, :-1])
                ref = distribution.apply(policy.reference_logits(**inputs).float()[:, :-1])
                logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
                per_token = (logp.exp() * (logp - logq)).sum(-1)
                mask = inputs["decoder_attention_mask"][:, 1:].to(per_token.dtype)
                out.extend(float(x) for x in (per_token * mask).sum(-1).cpu())
    finally:
        policy.train(was_training)
    return out

def _generate(model, tokenizer, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int], *, batch_size: int,
              max_new_tokens: int, sampling: dict, on_batch=None) -> tuple[list, list[str], list[int]]:
    """Batched, per-row-seeded generation of one response per (prompt, seed)."""
    from .ppo.rollout import generate

    responses, texts, lengths = [], [], []
    for i in range(0, len(prompt_ids), batch_size):
        batch_ids, batch_seeds = prompt_ids[i:i + batch_size], seeds[i:i + batch_size]
        roll = generate(model, tokenizer, batch_ids, max_new_tokens=max_new_tokens, seeds=batch_seeds, **sampling)
        responses.extend(roll.responses)
        texts.extend(roll.texts)
        lengths.extend(roll.lengths)
        if on_batch is not None:
            on_batch(i, i + len(batch_ids), roll)
    return responses, texts, lengths


def evaluate_policy(policy, classifier, dataset, cfg: HarnessConfig, *, use_reference: bool,
                    second_classifier=None, faithfulness_judge=None, progress: bool = True, base: bool = False,
                    parallel: Parallel = SINGLE) -> EvalOutput:
    """Evaluate the reference (``use_reference=True``: the starting policy) or the policy on the test prompts;
    ``base=True`` (with ``use_reference``) evaluates the bare base model instead, every adapter off (it
    differs from the reference only when the run starts from an adapter, e.g. the SFT warm start).

    The first ``cfg.eval.num_samples`` rows of ``dataset`` are used (a HarnessError naming the available
    count when there are fewer), each with ``cfg.eval.samples_per_prompt`` samples seeded by
    :func:`sample_seed`; generation follows ``cfg.eval`` in batches of ``cfg.eval.batch_size``. Rewards and
    toxicity come from one classifier pass on ``reward_texts(query, response, cfg.reward.input)``. KL to
    the reference is computed for the policy; for the reference itself it is 0 by construction.
    ``faithfulness_judge`` (a :class:`harness.faithfulness.FaithfulnessJudge`, or None) scores each response
    against its dialogue (:func:`harness.data.prompt_dialogues`): each row's ``faithfulness`` (None without it).

    Data-parallel (``parallel`` of several processes): each process generates and scores a contiguous share of
    the (prompt, sample) items, with their own seeds, and every process gets all the samples, in order.
    """
    import torch

    from .data import prompt_dialogues
    from .ppo.core import SampledDistribution
    from .toxicity import reward_texts

    t0 = time.time()
    e = cfg.eval
    distribution = SampledDistribution.of(e, policy.tokenizer.eos_token_id)
    rows = select_prompts(dataset, e.num_samples)
    k = e.samples_per_prompt
    queries_p, refs_p, ids_p = list(rows["query"]), _references(rows), _prompt_ids(rows, policy.tokenizer)
    items = [(p, s) for p in range(len(rows)) for s in range(k)]
    items = [items[i] for i in parallel.shard(len(items))]  # all of them with one process
    seeds = [sample_seed(e.seed, p, s, k) for p, s in items]
    prompt_ids = [ids_p[p] for p, _ in items]
    generation = {"batch_size": e.batch_size, "max_new_tokens": e.max_new_tokens, "sampling": e.sampling_kwargs()}
    compute_kl = not use_reference and (policy.is_peft or policy.ref_model is not None)
    kls: list[float] = []
    phase = ("base (adapters off)" if base else "before (reference)") if use_reference else "after (policy)"
    with _progress(len(items), f"eval {phase}", progress and parallel.is_main) as bar:
        def on_batch(lo, hi, roll):
            if compute_kl:
                kls.extend(sequence_kl(policy, [torch.as_tensor(x) for x in prompt_ids[lo:hi]], roll.responses,
                                       chunk=e.batch_size, distribution=distribution))
            bar.update(hi - lo)

        if use_reference:
            with (policy.base() if base else policy.reference()) as ref:
                responses, texts, lengths = _generate(ref, policy.tokenizer, prompt_ids, seeds, **generation,
                                                      on_batch=on_batch)
        else:
            responses, texts, lengths = _generate(policy.model, policy.tokenizer, prompt_ids, seeds, **generation,
                                                  on_batch=on_batch)
        bar.set_description(f"eval {phase}: scoring")
        queries = [queries_p[p] for p, _ in items]
        scored = reward_texts(queries, texts, cfg.reward.input)
        logits = classifier.logits(scored)
        logp = classifier.log_probabilities(logits)
        columns = {
            "toxicity": logp[:, classifier.toxic_index].exp().tolist(),
            "reward": classifier.reward(logits, cfg.reward.transform).tolist(),
            # log P(not toxic), from the toxic label: min_logp_clean_gain reads it whatever reward.label is
            "clean_logprob": classifier.clean_log_probabilities(logits).tolist(),
            # the reference judges query + response; the response alone is what the policy wrote
            "response_toxicity": (logp[:, classifier.toxic_index].exp() if cfg.reward.input == "response"
                                  else classifier.toxicity(texts)).tolist(),
            "second_toxicity": (second_classifier.toxicity(scored).tolist() if second_classifier is not None
                                else [None] * len(items)),
        }
        if faithfulness_judge is not None:
            bar.set_description(f"eval {phase}: faithfulness")
            dialogues = prompt_dialogues(rows, cfg.data.prompt_template)
            columns["faithfulness"] = faithfulness_judge.score([dialogues[p] for p, _ in items], texts)
        else:
            columns["faithfulness"] = [None] * len(items)
    if not compute_kl:
        kls = [0.0] * len(items)
    samples = [{"prompt_index": p, "sample_index": s, "seed": seed, "query": queries_p[p], "references": refs_p[p],
                "response": text, "length": int(n), "kl": float(kl), **{k: v[i] for k, v in columns.items()}}
               for i, ((p, s), seed, text, n, kl) in enumerate(zip(items, seeds, texts, lengths, kls))]
    response_ids = [r.tolist() for r in responses]
    if parallel.distributed:
        samples, response_ids = parallel.gather_object(samples), parallel.gather_object(response_ids)
    return EvalOutput(metrics=phase_metrics(samples, cfg), samples=samples, seconds=time.time() - t0,
                      response_ids=response_ids)
