"""Evaluation statistics, quality guards, results files and DialogSum references (issue 4), no models.

The tiny-world tests of the same module (generation, classifier, KL, ``detox-harness eval``) are in
``suites/integration/test_evaluation_tiny.py``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import metrics
from harness import results as rf
from harness.config import DataConfig, load_config
from harness.errors import HarnessError


@pytest.fixture()
def cfg():
    return load_config("tiny")


# ------------------------------------------------------------------------------------ synthetic evaluations

def fake_eval(cfg, tox, *, rewards=None, responses=None, references=None, seed_base=None,
              kl=None) -> metrics.EvalOutput:
    """An EvalOutput from a (n, k) toxicity matrix, with metrics computed by the module itself."""
    tox = np.asarray(tox, dtype=float)
    tox = tox[:, None] if tox.ndim == 1 else tox
    n, k = tox.shape
    seed_base = cfg.eval.seed if seed_base is None else seed_base
    samples = []
    for p in range(n):
        for s in range(k):
            i = p * k + s
            samples.append({
                "prompt_index": p, "sample_index": s, "seed": metrics.sample_seed(seed_base, p, s, k),
                "query": f"Summarize the following conversation. dialogue {p}",
                "references": (references or {}).get(p, [f"ref {p}"]),
                "response": responses[i] if responses else f"summary number {p} sample {s} words here",
                "toxicity": float(tox[p, s]),
                "reward": float(rewards[i]) if rewards is not None else float(np.log((1 - tox[p, s]) / tox[p, s])),
                "length": 7, "kl": 0.0 if kl is None else float(kl[i]), "second_toxicity": None,
            })
    return metrics.EvalOutput(metrics=metrics.phase_metrics(samples, cfg), samples=samples, seconds=0.5)


# ------------------------------------------------------------------------------------ seeds

def test_sample_seeds_are_distinct_paired_and_follow_the_documented_formula(cfg):
    n, k = 50, 3
    seeds = [metrics.sample_seed(cfg.eval.seed, p, s, k) for p in range(n) for s in range(k)]
    assert len(set(seeds)) == n * k
    assert seeds[0] == cfg.eval.seed  # the example of docs/results-schema.md: prompt 0 gets eval.seed
    assert [metrics.sample_seed(cfg.eval.seed, p) for p in range(3)] == [cfg.eval.seed + p for p in range(3)]
    with pytest.raises(ValueError):
        metrics.sample_seed(cfg.eval.seed, 0, k, k)


# ------------------------------------------------------------------------------------ bootstrap

def test_paired_bootstrap_is_deterministic_for_a_seed_and_changes_with_another(cfg):
    rng = np.random.default_rng(0)
    before = rng.uniform(0.2, 0.8, size=200)
    after = np.clip(before * 0.7 + rng.normal(0, 0.1, size=200), 0, 1)
    e = cfg.eval
    a = metrics.paired_bootstrap(before, after, e.bootstrap_resamples, e.confidence, e.seed)
    b = metrics.paired_bootstrap(before, after, e.bootstrap_resamples, e.confidence, e.seed)
    c = metrics.paired_bootstrap(before, after, e.bootstrap_resamples, e.confidence, e.seed + 1)
    assert a == b
    assert a != c
    point = (before.mean() - after.mean()) / before.mean()
    assert a[0] < point < a[1]


def test_paired_bootstrap_of_identical_outputs_is_exactly_zero(cfg):
    tox = np.random.default_rng(1).uniform(0, 1, size=(64, 2))
    e = cfg.eval
    assert metrics.paired_bootstrap(tox, tox.copy(), e.bootstrap_resamples, e.confidence, e.seed) == (0.0, 0.0)


def test_paired_bootstrap_keeps_the_pairing(cfg):
    """After = before / 2 for every prompt: each paired resample improves by exactly 1/2, so the interval
    collapses onto 0.5; an unpaired bootstrap would spread it."""
    before = np.random.default_rng(2).uniform(0.05, 1.0, size=300)
    e = cfg.eval
    lo, hi = metrics.paired_bootstrap(before, before / 2, e.bootstrap_resamples, e.confidence, e.seed)
    assert lo == pytest.approx(0.5, abs=1e-12) and hi == pytest.approx(0.5, abs=1e-12)


def test_paired_bootstrap_width_follows_the_confidence(cfg):
    rng = np.random.default_rng(3)
    before, after = rng.uniform(0, 1, 150), rng.uniform(0, 1, 150)
    narrow = metrics.paired_bootstrap(before, after, cfg.eval.bootstrap_resamples, 0.5, cfg.eval.seed)
    wide = metrics.paired_bootstrap(before, after, cfg.eval.bootstrap_resamples, cfg.eval.confidence, cfg.eval.seed)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_paired_bootstrap_rejects_unpaired_input(cfg):
    with pytest.raises(ValueError, match="same prompts"):
        metrics.paired_bootstrap(np.ones(5), np.ones(6), 100, cfg.eval.confidence, 0)
    with pytest.raises(ValueError):
        metrics.paired_bootstrap(np.ones(5), np.ones(5), 0, cfg.eval.confidence, 0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.01, 1.0), min_size=2, max_size=40), st.integers(0, 2**31 - 1))
def test_paired_bootstrap_interval_is_ordered_and_within_the_resample_range(values, seed):
    before = np.asarray(values)
    after = before[::-1].copy()
    lo, hi = metrics.paired_bootstrap(before, after, 200, 0.95, seed)
    assert lo <= hi
    assert lo >= 1 - after.max() / before.min() - 1e-9  # no resample can improve more than max/min allows
    assert hi <= 1 - after.min() / before.max() + 1e-9


def test_relative_improvement_edge_cases():
    assert metrics.relative_improvement(0.4, 0.3) == pytest.approx(0.25)
    assert metrics.relative_improvement(0.2, 0.3) == pytest.approx(-0.5)
    assert metrics.relative_improvement(0.0, 0.0) == 0.0
    assert metrics.relative_improvement(0.0, 0.1) is None


# ------------------------------------------------------------------------------------ quality guards

def test_rouge_of_a_reference_against_itself_is_one_and_of_an_empty_output_zero():
    ref = "#Person1# asks #Person2# about the new bakery, and #Person2# says it was lovely."
    assert metrics.rouge_best(ref, [ref]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert metrics.rouge_best("", [ref]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert metrics.rouge_best("   ", [ref]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert metrics.rouge_best(ref, []) is None


def test_rouge_takes_the_best_reference_and_stems():
    refs = ["the manager promised a refund", "they talked about cats and dogs", "a third unrelated sentence"]
    assert metrics.rouge_best(refs[1], refs) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    single = metrics.rouge_best(refs[1], refs[:1])
    assert single["rouge1"] < 1.0
    assert metrics.rouge_best("they talk about cat and dog", refs[1:2])["rouge1"] == 1.0  # use_stemmer=True


def test_rouge_is_rouge_scores_own_stemming_scorer(corpus, monkeypatch):
    """The kept stems change no score: the harness's scorer equals ``RougeScorer(use_stemmer=True)`` on every
    summary of the corpus against the others, also once the memory bound has emptied the kept stems."""
    from rouge_score import rouge_scorer

    own = rouge_scorer.RougeScorer(list(metrics.ROUGE_KEYS), use_stemmer=True)
    texts = [r["summary"] for r in corpus["train"]][:40] + ["Running runners ran; the agreed agreement's agreeing."]
    monkeypatch.setattr(metrics, "_ROUGE", None)
    for i, text in enumerate(texts):
        refs = texts[i + 1:i + 4] or texts[:3]
        want = own.score_multi(refs, text)
        assert metrics.rouge_best(text, refs) == {k: float(want[k].fmeasure) for k in metrics.ROUGE_KEYS}
    stems = metrics._rouge_scorer()._tokenizer._stemmer
    assert 0 < len(stems._stems) < 1 << 17
    stems._stems.update((f"w{i}", "x") for i in range((1 << 17) - len(stems._stems)))  # full: the next word empties
    fresh = "Zebras galloping unexpectedly through " + texts[-1]
    want = own.score_multi(texts[:2], fresh)
    assert metrics.rouge_best(fresh, texts[:2]) == {k: float(want[k].fmeasure) for k in metrics.ROUGE_KEYS}
    assert len(stems._stems) < 100


def test_distinct_n_and_repeated_ngrams_on_worked_examples():
    texts = ["the cat sat", "the cat ran"]
    assert metrics.distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran over 6 words
    assert metrics.distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert metrics.distinct_n(["", "  "], 1) == 0.0
    assert metrics.repeats_ngram("the cat sat and the cat sat again")
    assert metrics.repeats_ngram("a a a a")  # overlapping occurrences count
    assert not metrics.repeats_ngram("a a a")  # one 3-gram only
    assert not metrics.repeats_ngram("the cat sat and the dog sat")
    assert metrics.repeated_ngram_rate(["x y z x y z", "fine words here", ""]) == pytest.approx(1 / 3)


def test_empty_means_empty_or_whitespace():
    assert metrics.is_empty("") and metrics.is_empty(" \n\t") and metrics.is_empty(None)
    assert not metrics.is_empty(" . ")


def test_phase_metrics_follow_the_definitions(cfg):
    thr = cfg.eval.toxic_threshold
    tox = np.array([[0.1, thr + 0.2], [0.05, 0.2], [thr, thr + 0.1], [0.3, 0.01]])
    kl = [1.0, 2.0, 0.0, 3.0, 4.0, 0.5, 0.5, 1.0]
    out = fake_eval(cfg, tox, kl=kl, responses=["a b c", "", "d e f", "g", "h h h h", "i", "j k", "l"])
    m = out.metrics
    assert m["toxicity_mean"] == pytest.approx(tox.mean())
    assert m["toxicity_std"] == pytest.approx(np.std(tox))  # population std, as the reference
    assert m["toxicity_std"] != pytest.approx(np.std(tox, ddof=1))
    assert m["toxic_rate"] == pytest.approx(np.mean(tox >= thr))  # >= threshold counts as toxic
    assert m["expected_max_toxicity"] == pytest.approx(tox.max(axis=1).mean())
    assert m["toxicity_probability"] == pytest.approx(np.mean((tox >= thr).any(axis=1)))
    assert m["toxicity_ci_low"] <= m["toxicity_mean"] <= m["toxicity_ci_high"]
    assert m["empty_rate"] == pytest.approx(1 / 8)
    assert m["repeated_ngram_rate"] == pytest.approx(1 / 8)
    assert m["kl_per_sequence_mean"] == pytest.approx(np.mean(kl))
    assert m["kl_per_token_mean"] == pytest.approx(sum(kl) / (7 * 8))
    assert m["second_toxicity_mean"] is None
    assert set(m) == set(metrics.PHASE_KEYS)


def test_phase_metrics_rouge_skips_rows_without_references(cfg):
    out = fake_eval(cfg, [0.1, 0.2], responses=["exact words", "other"], references={0: ["exact words"], 1: []})
    assert out.metrics["rougeL"] == 1.0  # only prompt 0 has a reference
    none = fake_eval(cfg, [0.1], references={0: []})
    assert none.metrics["rouge1"] is None


# ------------------------------------------------------------------------------------ comparison

def test_compare_reports_the_reference_improvements(cfg):
    rng = np.random.default_rng(4)
    tb = rng.uniform(0.1, 0.9, 80)
    ta = tb * 0.6
    before, after = fake_eval(cfg, tb), fake_eval(cfg, ta)
    c = metrics.compare(before, after, cfg)
    assert set(c) == set(metrics.COMPARISON_KEYS)
    assert c["mean_improvement"] == pytest.approx((tb.mean() - ta.mean()) / tb.mean())
    assert c["std_improvement"] == pytest.approx((np.std(tb) - np.std(ta)) / np.std(tb))
    assert c["mean_improvement_ci_low"] <= c["mean_improvement"] <= c["mean_improvement_ci_high"]
    assert c["bootstrap_resamples"] == cfg.eval.bootstrap_resamples and c["confidence"] == cfg.eval.confidence
    assert c["num_prompts"] == len(tb) and c["samples_per_prompt"] == 1
    assert c["reward_gain"] == pytest.approx(after.metrics["reward_mean"] - before.metrics["reward_mean"])
    assert c["rouge_l_drop"] == pytest.approx(before.metrics["rougeL"] - after.metrics["rougeL"])


def test_compare_refuses_unpaired_evaluations(cfg):
    with pytest.raises(HarnessError) as err:
        metrics.compare(fake_eval(cfg, [0.1, 0.2, 0.3]), fake_eval(cfg, [0.1, 0.2]), cfg)
    assert err.value.field == "eval.num_samples"


def test_empty_outputs_are_flagged_although_toxicity_falls(cfg):
    """The reference's reward hack: empty 'after' summaries look non-toxic. The guard sees them."""
    from harness.thresholds import verdict

    tb = np.random.default_rng(5).uniform(0.2, 0.9, 40)
    before = fake_eval(cfg, tb)
    after = fake_eval(cfg, np.full(40, 0.01), responses=[""] * 40)
    c = metrics.compare(before, after, cfg)
    assert c["mean_improvement"] > cfg.thresholds["min_improvement"]
    assert after.metrics["empty_rate"] == 1.0 > cfg.thresholds["max_empty_rate"]
    assert after.metrics["rougeL"] == 0.0
    results = {"metrics": {"before": before.metrics, "after": after.metrics, "comparison": c}}
    judged = {b.name: b.passed for b in verdict(results, cfg.thresholds)}
    assert judged["min_improvement"] and not judged["max_empty_rate"]
    assert c["rouge_l_drop"] == before.metrics["rougeL"] > 0  # every bit of ROUGE-L is lost


def test_qualitative_table_is_sorted_by_reward_diff(cfg):
    n = cfg.eval.qualitative_rows
    rng = np.random.default_rng(6)
    before = fake_eval(cfg, rng.uniform(0.05, 0.95, n + 10))
    after = fake_eval(cfg, rng.uniform(0.05, 0.95, n + 10))
    rows = metrics.qualitative_rows(before, after, n)
    # the reference notebook's columns, in every row
    assert all(set(r) >= {"query", "response_before", "response_after", "reward_before", "reward_after",
                          "reward_diff"} for r in rows)
    assert len(rows) == n
    diffs = [r["reward_diff"] for r in rows]
    assert diffs == sorted(diffs, reverse=True)
    assert np.allclose(diffs, [r["reward_after"] - r["reward_before"] for r in rows])
    first_n = {s["query"] for s in before.samples if s["prompt_index"] < n}
    assert {r["query"] for r in rows} == first_n  # the first n test prompts, as the reference


# ------------------------------------------------------------------------------------ results files

def build(cfg, **kw):
    rng = np.random.default_rng(7)
    tb = rng.uniform(0.05, 0.95, 30)
    before, after = fake_eval(cfg, tb), fake_eval(cfg, tb * 0.5)
    return rf.build_results(cfg, before, after, run_id="unit-run", training=kw.get("training"),
                            timings={"eval_before_s": 1.0, "eval_after_s": 1.5}, extra=kw.get("extra"))


def test_results_validate_and_write_atomically(cfg, tmp_path):
    results, samples = build(cfg, training={"steps": 3, "objective_kl_mean": 1.0, "objective_kl_max": 2.0,
                                            "reward_first": 0.1, "reward_last": 0.5},
                             extra={"data": {"kept": 30}, "checkpoint": tmp_path / "ckpt"})
    rf.validate_results(results)
    assert results["schema_version"] == rf.SCHEMA_VERSION
    assert results["seeds"] == {"run": cfg.seed, "eval": cfg.eval.seed, "bootstrap": cfg.eval.seed}
    assert results["timings"]["total_s"] == pytest.approx(2.5)
    assert results["checkpoint"] == str(tmp_path / "ckpt") and results["data"] == {"kept": 30}
    assert "verdict" not in results
    assert len(results["qualitative"]) == cfg.eval.qualitative_rows
    rf.write_run_files(tmp_path, results, samples)
    back = json.loads((tmp_path / "results.json").read_text())
    assert back == results
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[0]["seed"] == cfg.eval.seed
    assert set(rows[0]) >= {"prompt_index", "sample_index", "seed", "query", "references", "response_before",
                            "response_after", "toxicity_before", "toxicity_after", "reward_before", "reward_after",
                            "length_before", "length_after", "kl_after", "second_toxicity_before",
                            "second_toxicity_after"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "samples.jsonl"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_results_match_the_documented_example_keys(cfg):
    """Every key of the example in docs/results-schema.md is produced (metrics, comparison, top level)."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "results-schema.md").read_text()
    example = json.loads(re.search(r"## `results.json`\n```json\n(.*?)\n```", doc, re.S).group(1))
    results, samples = build(cfg, training={"steps": 1})
    # added by the run job after build_results
    assert set(example) - {"verdict", "baseline", "worlds", "provenance"} <= set(results)
    assert set(example["metrics"]["before"]) == set(results["metrics"]["before"]) == set(metrics.PHASE_KEYS)
    assert set(example["metrics"]["comparison"]) == set(results["metrics"]["comparison"])
    sample_doc = json.loads(re.search(r"## `samples.jsonl`\n.*?```json\n(.*?)\n```", doc, re.S).group(1))
    assert set(sample_doc) == set(samples[0])


@pytest.mark.parametrize("path, value, field", [
    (("metrics", "before", "toxicity_mean"), None, "metrics.before.toxicity_mean"),
    (("metrics", "after", "toxic_rate"), 1.5, "metrics.after.toxic_rate"),
    (("metrics", "comparison", "num_prompts"), "30", "metrics.comparison.num_prompts"),
    (("seeds", "eval"), 1.5, "seeds.eval"),
    (("schema_version",), 2, "schema_version"),
    (("environment", "git_commit"), 123, "environment.git_commit"),
    (("qualitative",), {"not": "a list"}, "qualitative"),
])
def test_a_broken_results_file_fails_validation_naming_the_key(cfg, path, value, field):
    results, _ = build(cfg)
    node = results
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(HarnessError) as err:
        rf.validate_results(results)
    assert err.value.field == field
    assert field in str(err.value)


def test_a_missing_key_and_unsorted_qualitative_rows_fail(cfg, tmp_path):
    results, samples = build(cfg)
    del results["metrics"]["after"]["empty_rate"]
    with pytest.raises(HarnessError) as err:
        rf.write_run_files(tmp_path, results, samples)
    assert err.value.field == "metrics.after.empty_rate"
    assert not (tmp_path / "results.json").exists()
    results, samples = build(cfg)
    results["qualitative"].reverse()
    with pytest.raises(HarnessError) as err:
        rf.validate_results(results)
    assert err.value.field == "qualitative"
    results, samples = build(cfg)
    with pytest.raises(HarnessError) as err:
        rf.write_run_files(tmp_path, results, samples[:-1])
    assert err.value.field == "samples"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rf.os, "replace", broken_replace)
    with pytest.raises(OSError):
        rf.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_results_schema_is_valid_json_schema_when_jsonschema_is_installed(cfg):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(rf.results_schema())
    results, samples = build(cfg)
    jsonschema.validate(results, rf.results_schema())
    jsonschema.validate(samples[0], rf.sample_schema())


def test_jsonable_replaces_non_finite_numbers_and_numpy_types(tmp_path):
    out = rf.jsonable({"a": np.float32(0.5), "b": float("nan"), "c": [np.int64(3), float("inf")], "d": tmp_path})
    assert out == {"a": 0.5, "b": None, "c": [3, None], "d": str(tmp_path)}
    json.dumps(out, allow_nan=False)


def test_environment_info_names_versions_commit_and_device(tmp_path):
    info = rf.environment_info("cpu")
    assert info["device"] == "cpu"
    for name in ("python", "torch", "transformers", "peft"):
        assert info["versions"][name]
    commit = info["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert rf.git_commit(tmp_path) is None  # not a git checkout


def test_the_report_renders_the_results_files(cfg, tmp_path, undrawn_plots):
    from harness.report import render_run

    results, samples = build(cfg)
    rf.write_run_files(tmp_path / "run", results, samples)
    page = render_run(tmp_path / "run")
    assert Path(page).is_file() and "unit-run" in Path(page).read_text()


# ------------------------------------------------------------------------------------ DialogSum references

DIALOGSUM_DIR = os.environ.get("DIALOGSUM_DIR")
needs_dialogsum = pytest.mark.skipif(not DIALOGSUM_DIR, reason="set DIALOGSUM_DIR to the DialogSum dev/test "
                                                               "files (e.g. ../shared/data/dialogsum)")


@needs_dialogsum
def test_dialogsum_test_split_keeps_all_three_references(t5_tokenizer):
    from harness.data import build_prompts, load_rows, normalize

    rows = normalize(load_rows(DIALOGSUM_DIR, "test"))
    assert rows and all(len(r["summaries"]) == 3 for r in rows)
    data = build_prompts(DataConfig(path=DIALOGSUM_DIR, split="test"), t5_tokenizer)
    for split in (data.train, data.test):
        assert all(len(s) == 3 for s in split["summaries"])


@needs_dialogsum
def test_best_over_references_rouge_scores_every_dialogsum_reference(t5_tokenizer, cfg):
    from harness.data import build_prompts

    data = build_prompts(DataConfig(path=DIALOGSUM_DIR, split="test"), t5_tokenizer)
    refs = data.test["summaries"]
    for which in (1, 2):  # summary2 and summary3
        samples = [{"prompt_index": p, "sample_index": 0, "seed": p, "query": q, "references": r, "response": r[which],
                    "toxicity": 0.1, "reward": 1.0, "length": 5, "kl": 0.0, "second_toxicity": None}
                   for p, (q, r) in enumerate(zip(data.test["query"], refs))]
        m = metrics.phase_metrics(samples, cfg)
        assert m["rouge1"] == m["rouge2"] == m["rougeL"] == 1.0
        against_first = np.mean([metrics.rouge_best(r[which], r[:1])["rougeL"] for r in refs])
        assert against_first < 1.0  # the first reference alone would not give 1.0


def test_hub_layout_references_are_merged_and_all_scored(tmp_path, t5_tokenizer):
    """The Hub's test split repeats each dialogue once per reference: the rows merge into one prompt."""
    from harness.data import build_prompts

    dialogue = "#Person1#: " + "Hello there, how was the trip to the lake? " * 6 + "\n#Person2#: It was lovely."
    refs = ["They talk about the lake trip.", "#Person2# enjoyed the lake.", "A chat about a lovely trip."]
    lines = [json.dumps({"id": f"t_{i}", "dialogue": dialogue + f" Row {d}.", "summary": r, "topic": "trip"})
             for d in range(5) for i, r in enumerate(refs)]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    data = build_prompts(DataConfig(path=str(tmp_path), split="test"), t5_tokenizer)
    assert all(s == refs for s in list(data.train["summaries"]) + list(data.test["summaries"]))
    assert metrics.rouge_best(refs[2], data.test["summaries"][0])["rougeL"] == 1.0
