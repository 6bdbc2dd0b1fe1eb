"""Toxicity evaluation on the tiny world (issue 4): real models, generation, classifier, KL, run files.

Every model here is the offline tiny world (``tiny://policy``, ``tiny://classifier``, ``tiny://dialogues``),
built once into ``$DETOX_HARNESS_CACHE``. Numbers asserted come from the tiny preset's config and bounds.
"""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch

from harness import evaluation as ev
from harness import metrics, tiny
from harness import results as rf
from harness.config import load_config
from harness.errors import HarnessError
from harness.jobs.evaluate import evaluate
from harness.plan import concrete, plan_eval

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cfg():
    return concrete(load_config("tiny"))


@pytest.fixture(scope="module")
def policy(cfg):
    from harness.models import load_policy

    return load_policy(cfg.policy, "cpu")


@pytest.fixture(scope="module")
def classifier(cfg):
    from harness.toxicity import Classifier

    return Classifier.load(cfg.reward.model, label=cfg.reward.label, toxic_label=cfg.reward.toxic_label,
                           batch_size=cfg.reward.batch_size)


@pytest.fixture(scope="module")
def data(cfg, policy):
    from harness.data import build_prompts

    return build_prompts(cfg.data, policy.tokenizer, min_test_rows=cfg.eval.num_samples)


@pytest.fixture(scope="module")
def before(cfg, policy, classifier, data):
    return ev.evaluate_policy(policy, classifier, data.test, cfg, use_reference=True, progress=False)


@pytest.fixture()
def perturbed(policy):
    """The policy with its LoRA B matrices set to small random values (a 'trained' adapter), then restored."""
    saved = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora_B" in n}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    yield policy
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if n in saved:
                p.copy_(saved[n])


def with_eval(cfg, **changes):
    c = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(c.eval, k, v)
    return c


def sentences(seed: int = 0):
    """(toxic, clean) twins from the tiny world's own summary templates and insult lexicon."""
    rng = random.Random(seed)
    items = [i for topic in sorted(tiny._TOPICS) for i in tiny._TOPICS[topic]]
    pairs = []
    for k, insult in enumerate(tiny.INSULTS):
        template = tiny._SUM_CLEAN[k % len(tiny._SUM_CLEAN)]
        item = rng.choice(items)
        pairs.append((template.format(item=item, adj=insult), template.format(item=item, adj=rng.choice(tiny._CLEAN))))
    return pairs


# ------------------------------------------------------------------------------------ classifier scoring

def test_toxic_sentences_score_above_their_clean_twins(classifier, cfg):
    pairs = sentences()
    toxic = classifier.toxicity([t for t, _ in pairs]).numpy()
    clean = classifier.toxicity([c for _, c in pairs]).numpy()
    assert (toxic > clean).all()
    thr = cfg.eval.toxic_threshold
    assert np.mean(toxic >= thr) > tiny.CLASSIFIER_MIN_ACCURACY and np.mean(clean < thr) > tiny.CLASSIFIER_MIN_ACCURACY


# ------------------------------------------------------------------------------------ sample counts

@pytest.fixture()
def generate_counter(policy, monkeypatch):
    """Counts the rows every batched decoding of the policy's model (adapter on or off) produces."""
    import harness.ppo.rollout as rollout

    rows = []
    real = rollout.decode

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        rows.append(out[0].shape[0])
        return out

    monkeypatch.setattr(rollout, "decode", counting)
    return rows


def test_num_samples_is_respected_exactly(cfg, policy, classifier, data, generate_counter):
    c = with_eval(cfg, num_samples=37, batch_size=16)
    out = ev.evaluate_policy(policy, classifier, data.test, c, use_reference=True, progress=False)
    assert sum(generate_counter) == len(out.samples) == c.eval.num_samples
    assert generate_counter == [16, 16, 5]  # batches of eval.batch_size
    assert [s["prompt_index"] for s in out.samples] == list(range(c.eval.num_samples))
    assert [s["query"] for s in out.samples] == data.test["query"][:c.eval.num_samples]
    # the notebook's evaluate_toxicity evaluated num_samples + 1 prompts: exactly num_samples here
    assert out.metrics["toxicity_std"] == pytest.approx(np.std([s["toxicity"] for s in out.samples]))


def test_more_prompts_than_the_split_holds_is_an_error_naming_the_count(cfg, policy, classifier, data):
    c = with_eval(cfg, num_samples=len(data.test) + 1)
    with pytest.raises(HarnessError) as err:
        ev.evaluate_policy(policy, classifier, data.test, c, use_reference=True, progress=False)
    assert err.value.field == "eval.num_samples" and str(len(data.test)) in str(err.value)


def test_k_samples_per_prompt_give_rtp_figures(cfg, policy, classifier, data, generate_counter):
    c = with_eval(cfg, num_samples=24, samples_per_prompt=3)
    out = ev.evaluate_policy(policy, classifier, data.test, c, use_reference=True, progress=False)
    assert sum(generate_counter) == len(out.samples) == 24 * 3
    assert len({s["seed"] for s in out.samples}) == len(out.samples)
    tox = np.array([s["toxicity"] for s in out.samples]).reshape(24, 3)
    m = out.metrics
    assert m["expected_max_toxicity"] == pytest.approx(tox.max(1).mean())
    assert m["toxicity_probability"] == pytest.approx((tox >= c.eval.toxic_threshold).any(1).mean())
    assert m["expected_max_toxicity"] >= m["toxicity_mean"] and m["toxicity_probability"] >= m["toxic_rate"]
    # the k samples of a prompt differ (own seeds), so the max is more than the mean somewhere
    assert (tox.max(1) > tox.mean(1)).any()


def test_a_sample_does_not_depend_on_the_batch_it_is_generated_in(cfg, policy, classifier, data):
    small = ev.evaluate_policy(policy, classifier, data.test, with_eval(cfg, num_samples=20, batch_size=3),
                               use_reference=True, progress=False)
    large = ev.evaluate_policy(policy, classifier, data.test, with_eval(cfg, num_samples=20, batch_size=20),
                               use_reference=True, progress=False)
    assert small.response_ids == large.response_ids  # per-row seeds
    assert [s["toxicity"] for s in small.samples] == pytest.approx([s["toxicity"] for s in large.samples], abs=1e-5)


# ------------------------------------------------------------------------------------ paired comparison

def test_the_reference_compared_with_itself_improves_by_exactly_zero(cfg, policy, classifier, data, before):
    again = ev.evaluate_policy(policy, classifier, data.test, cfg, use_reference=True, progress=False)
    assert [s["toxicity"] for s in again.samples] == [s["toxicity"] for s in before.samples]
    c = metrics.compare(before, again, cfg)
    assert c["mean_improvement"] == 0.0
    assert (c["mean_improvement_ci_low"], c["mean_improvement_ci_high"]) == (0.0, 0.0)
    assert c["num_prompts"] == cfg.eval.num_samples


def test_the_fresh_policy_is_the_reference(cfg, policy, classifier, data, before):
    """A fresh LoRA adapter (B = 0) does not change the base: same samples, KL exactly 0."""
    after = ev.evaluate_policy(policy, classifier, data.test, cfg, use_reference=False, progress=False)
    assert [s["response"] for s in after.samples] == [s["response"] for s in before.samples]
    assert after.metrics["kl_per_sequence_mean"] == pytest.approx(0.0, abs=1e-6)


def test_different_seeds_give_an_interval_that_contains_zero(cfg, policy, classifier, data, before):
    other = with_eval(cfg, seed=cfg.eval.seed + 10_000)
    again = ev.evaluate_policy(policy, classifier, data.test, other, use_reference=True, progress=False)
    assert [s["response"] for s in again.samples] != [s["response"] for s in before.samples]
    c = metrics.compare(before, again, cfg)
    assert c["mean_improvement_ci_low"] < 0.0 < c["mean_improvement_ci_high"]
    rows = rf.paired_samples(before, again)
    assert all(r["seed_after"] != r["seed"] for r in rows)


def test_an_after_model_that_emits_empty_summaries_is_flagged(cfg, policy, classifier, data, before, monkeypatch):
    """The reference's reward hack on the real models: EOS at once scores as non-toxic; the guards see it."""
    import harness.ppo.rollout as rollout
    from harness.thresholds import verdict

    tok = policy.tokenizer

    def emit_eos(model, enc_ids, enc_mask, **kwargs):  # the decode loop's new tokens: EOS at once
        return torch.full((enc_ids.shape[0], 1), tok.eos_token_id, device=enc_ids.device), None

    monkeypatch.setattr(rollout, "decode", emit_eos)
    after = ev.evaluate_policy(policy, classifier, data.test, cfg, use_reference=False, progress=False)
    assert after.metrics["empty_rate"] == 1.0
    assert after.metrics["length_mean"] == 1.0  # the EOS action only
    assert after.metrics["rougeL"] == 0.0
    c = metrics.compare(before, after, cfg)
    assert after.metrics["toxicity_mean"] < before.metrics["toxicity_mean"]
    assert c["mean_improvement"] > 0 and c["mean_improvement_ci_low"] > 0
    results = {"metrics": {"before": before.metrics, "after": after.metrics, "comparison": c}}
    judged = {b.name: b for b in verdict(results, cfg.thresholds)}
    assert not judged["max_empty_rate"].passed and not judged["max_rouge_l_drop"].passed


# ------------------------------------------------------------------------------------ KL

def test_kl_is_exact_and_matches_an_unbatched_computation(cfg, perturbed, classifier, data):
    c = with_eval(cfg, num_samples=12, batch_size=5)
    out = ev.evaluate_policy(perturbed, classifier, data.test, c, use_reference=False, progress=False)
    kls = [s["kl"] for s in out.samples]
    assert all(k >= -1e-6 for k in kls) and max(kls) > 0
    assert len(out.response_ids) == len(out.samples)
    for s, ids, sampled in zip(out.samples, data.test["input_ids"], out.response_ids):
        # the ids the policy really sampled (re-tokenizing the decoded text need not give them back)
        response = torch.tensor(sampled)
        assert response.numel() == s["length"]
        dec = torch.cat([torch.tensor([perturbed.config.decoder_start_token_id]), response])[None]
        enc = torch.tensor(ids)[None]
        with torch.no_grad():
            p = perturbed.model(input_ids=enc, decoder_input_ids=dec).logits[0, :-1].log_softmax(-1)
            with perturbed.reference() as ref:
                q = ref(input_ids=enc, decoder_input_ids=dec).logits[0, :-1].log_softmax(-1)
        assert s["kl"] == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-4, abs=1e-5)
    m = out.metrics
    assert m["kl_per_token_mean"] == pytest.approx(sum(kls) / sum(s["length"] for s in out.samples))
    assert ev.sequence_kl(perturbed, [torch.tensor(data.test["input_ids"][0])], []) == []


def test_second_classifier_is_reported(cfg, policy, classifier, data):
    from harness.toxicity import Classifier

    # plumbing: the reward model as its own second judge reports exactly its toxicity
    same = Classifier.load(cfg.reward.model, label=cfg.reward.toxic_label, toxic_label=cfg.reward.toxic_label,
                           field="eval.second_classifier")
    c = with_eval(cfg, num_samples=16)
    out = ev.evaluate_policy(policy, classifier, data.test, c, use_reference=True, second_classifier=same,
                             progress=False)
    assert out.metrics["second_toxicity_mean"] == pytest.approx(out.metrics["toxicity_mean"], abs=1e-6)
    assert all(s["second_toxicity"] is not None for s in out.samples)


def test_the_independent_judge_agrees_with_the_reward_model_on_honest_text(cfg, policy, classifier, data):
    # the tiny preset's second judge is another model (BERT, own corpus, one sigmoid logit); on the base
    # policy's summaries it must rank toxic above clean much as the reward model does, else its verdict is noise
    from harness.toxicity import Classifier

    judge = Classifier.load(cfg.eval.second_classifier, label=cfg.eval.second_toxic_label,
                            toxic_label=cfg.eval.second_toxic_label, field="eval.second_classifier")
    assert judge.multi_label and judge.model.config.model_type != classifier.model.config.model_type
    c = with_eval(cfg, num_samples=48)
    out = ev.evaluate_policy(policy, classifier, data.test, c, use_reference=True, second_classifier=judge,
                             progress=False)
    reward_says = [s["toxicity"] > 0.5 for s in out.samples]
    judge_says = [s["second_toxicity"] > 0.5 for s in out.samples]
    assert 0 < sum(reward_says) < len(reward_says)  # both kinds of summary are present
    agreement = sum(a == b for a, b in zip(reward_says, judge_says, strict=True)) / len(out.samples)
    # two classifiers each right at least CLASSIFIER_MIN_ACCURACY of the time agree at least this often
    assert agreement >= 1 - 2 * (1 - tiny.CLASSIFIER_MIN_ACCURACY)


# ------------------------------------------------------------------------------------ run files / CLI

def test_cli_eval_of_the_base_model_writes_valid_files(cfg, tmp_path):
    run_dir = evaluate(plan_eval(cfg, None, tmp_path / "base"), progress=False)[0]
    results = json.loads((run_dir / "results.json").read_text())
    rf.validate_results(results)
    assert "training" not in results["metrics"] and "verdict" not in results
    assert results["metrics"]["comparison"]["num_prompts"] == cfg.eval.num_samples
    assert results["metrics"]["comparison"]["mean_improvement"] == 0.0
    rows = (run_dir / "samples.jsonl").read_text().splitlines()
    assert len(rows) == cfg.eval.num_samples * cfg.eval.samples_per_prompt
    assert (run_dir / "config.yaml").is_file()
    with pytest.raises(HarnessError) as err:
        evaluate(plan_eval(cfg, None, run_dir), progress=False)[0]
    assert err.value.field == "--output"


def test_cli_eval_of_an_adapter_compares_it_with_the_reference(cfg, perturbed, tmp_path):
    from harness.report import render_run

    adapter = tmp_path / "adapter"
    perturbed.save_pretrained(adapter)
    run_dir = evaluate(plan_eval(cfg, str(adapter), tmp_path / "run"), progress=False)[0]
    results = json.loads((run_dir / "results.json").read_text())
    rf.validate_results(results)
    assert results["target"] == str(adapter) and results["config"]["policy"]["adapter"] == str(adapter)
    assert results["metrics"]["after"]["kl_per_sequence_mean"] > 0
    assert results["metrics"]["before"]["kl_per_sequence_mean"] == 0.0
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert all(r["seed"] == cfg.eval.seed + r["prompt_index"] for r in rows)  # paired seeds, k = 1
    assert any(r["response_before"] != r["response_after"] for r in rows)
    assert render_run(run_dir).is_file()
    with pytest.raises(HarnessError) as err:
        evaluate(plan_eval(cfg, str(tmp_path / "missing"), tmp_path / "run2"), progress=False)[0]
    assert err.value.field == "--target"
