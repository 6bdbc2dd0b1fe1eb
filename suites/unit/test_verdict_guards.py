"""A verdict that cannot be talked into PASS (issue 26): planted settings that used to pass, each refused (exit 2,
one line naming the fields) or failed, without training anything. Every limit comes from harness/thresholds.toml.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from harness import rundir
from harness import tiny as tiny_world
from harness.config import DataConfig, load_config
from harness.data import build_prompts, without_training_dialogues
from harness.errors import EXIT_BAD_INPUT, ConfigError
from harness.judges import check_judges, is_negation, same_model
from harness.plan import check_verdict_settings, concrete
from harness.report.render import verdict_context
from harness.thresholds import (
    BOUNDS,
    FAIL,
    PASS,
    PASS_LOOSENED,
    POWERED_BOUNDS,
    SFT_BOUNDS,
    format_table,
    judge,
    load_bounds,
    load_evidence,
    lookup,
)
from harness.toxicity import Classifier

PRESET = "tiny"


def tiny(*overrides: str):
    return load_config(PRESET, overrides=list(overrides))


def at(location: str) -> str:
    """A tiny-world id's directory (as a plan gives it to the judges)."""
    return str(tiny_world.resolve(location))


# ------------------------------------------------------------------------------------------ 1. labels and judges

@pytest.mark.parametrize("overrides,fields", [
    (["reward.label=hate"], "reward.label, reward.toxic_label"),
    (["reward.label=hate", "reward.toxic_label=nothate"], "reward.label, reward.toxic_label"),
    (["eval.second_classifier=tiny://classifier"], "eval.second_classifier"),
    (["eval.faithfulness_model=tiny://classifier"], "eval.faithfulness_model"),
    (["eval.second_toxic_label=nottoxic"], "eval.second_toxic_label"),  # a label the judge does not have
    (["reward.toxic_label=Hate"], "reward.toxic_label"),
    (["eval.faithfulness_model=tiny://judge"], "eval.faithfulness_model"),  # no entailment label: not an NLI judge
])
def test_labels_and_judges_that_measure_nothing_are_refused(overrides, fields):
    cfg = tiny(*overrides)
    with pytest.raises(ConfigError) as err:
        check_judges(concrete(cfg))
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert str(err.value).startswith(f"{fields}: ") and "\n" not in str(err.value)


def test_the_issues_inverted_run_is_refused_before_loading():
    """The issue's first case: trained on the clean class inverted, judged by the reward model itself."""
    cfg = tiny("reward.label=hate", "reward.toxic_label=nothate", "eval.second_classifier=tiny://classifier",
               "eval.second_toxic_label=nothate")
    with pytest.raises(ConfigError, match="inverted"):
        check_judges(concrete(cfg))


def test_a_judge_that_is_the_reward_model_under_another_path_is_refused(tmp_path):
    reward_dir = Path(concrete(tiny()).reward.model)
    (tmp_path / "link").symlink_to(reward_dir)
    copy_dir = shutil.copytree(reward_dir, tmp_path / "renamed-copy")
    for location in (str(reward_dir) + "/", str(tmp_path / "link"), str(copy_dir)):
        assert same_model(location, at("tiny://classifier"))
        with pytest.raises(ConfigError) as err:
            check_judges(concrete(tiny(f"eval.second_classifier={location}")))
        assert err.value.field == "eval.second_classifier"
    assert not same_model(at("tiny://judge"), at("tiny://classifier"))
    assert not same_model(at("tiny://flawed-classifier"), at("tiny://classifier"))  # same recipe, other weights


def test_inverted_labels_of_a_hub_model_are_refused_by_name_without_its_config():
    cfg = load_config("flan-t5-base", overrides=["reward.label=hate", "reward.toxic_label=nothate"])
    with pytest.raises(ConfigError, match="inverted"):
        check_judges(concrete(cfg))
    assert is_negation("nothate", "hate") and is_negation("NOT_TOXIC", "toxic") and not is_negation("hate", "hat")


@pytest.mark.parametrize("preset", ["tiny", "flan-t5-base"])
def test_the_presets_own_labels_and_judges_pass(preset):
    check_judges(concrete(load_config(preset)))
    flawed = ["reward.model=tiny://flawed-classifier"] if preset == "tiny" else []
    check_judges(concrete(load_config(preset, overrides=flawed)))


def test_log_p_clean_reads_the_toxic_label_whichever_label_the_reward_reads():
    """min_logp_clean_gain reads log(1 - P(toxic)): pointing the reward at the other label does not change it."""
    logits = torch.tensor([[2.0, -1.0], [-0.5, 1.5], [0.0, 0.0]])

    def classifier(label_index: int, multi_label: bool = False) -> Classifier:
        c = Classifier.__new__(Classifier)
        c.label_index, c.toxic_index, c.multi_label = label_index, 1, multi_label
        return c

    p_toxic = torch.softmax(logits, -1)[:, 1]
    for label_index in (0, 1):
        torch.testing.assert_close(classifier(label_index).clean_log_probabilities(logits), torch.log1p(-p_toxic))
    torch.testing.assert_close(classifier(1, True).clean_log_probabilities(logits),
                               torch.log1p(-torch.sigmoid(logits[:, 1])))


# ------------------------------------------------------------------------------------------ 2. bounds of the preset

def passing_results(bounds: dict[str, float]) -> dict:
    """A results dict whose every figure meets ``bounds`` (each a little beyond its limit), with the evidence the
    preset asks for and minimum detectable improvements below every limit."""
    metrics: dict = {}
    for name, limit in bounds.items():
        path, op, _ = BOUNDS[name]
        value = limit + 0.01 if op in (">", ">=") else limit - 0.01
        node = metrics
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    evidence = load_evidence(PRESET)
    c = metrics.setdefault("comparison", {})
    c["num_prompts"], c["bootstrap_resamples"] = evidence["min_num_samples"], evidence["min_bootstrap_resamples"]
    for name, path in POWERED_BOUNDS.items():
        c[path[-1]] = min(bounds.get(n, 1.0) for n in POWERED_BOUNDS) / 2
    return {"metrics": metrics}


PRESET_BOUNDS = {k: v for k, v in load_bounds(PRESET).items() if k not in SFT_BOUNDS}


def judged(results, bounds, **kw):
    return judge(results, bounds, PRESET_BOUNDS, evidence=load_evidence(PRESET), **kw)


def test_the_presets_bounds_met_pass():
    v = judged(passing_results(PRESET_BOUNDS), PRESET_BOUNDS)
    assert v.status == PASS and v.passed and not v.reasons
    assert all(b.preset == b.bound and b.change is None for b in v.bounds)


def loosened(bounds: dict[str, float], name: str) -> dict[str, float]:
    out = dict(bounds)
    op = BOUNDS[name][1]
    out[name] = bounds[name] - 1.0 if op in (">", ">=") else bounds[name] * 100 + 1.0
    return out


@pytest.mark.parametrize("name", ["min_improvement_ci_low", "max_kl"])
def test_a_loosened_bound_fails_unless_accepted_and_then_never_reads_plain_pass(name):
    bounds = loosened(PRESET_BOUNDS, name)
    results = passing_results(bounds)
    plain, accepted = judged(results, bounds), judged(results, bounds, accept_loosened=True)
    assert plain.status == FAIL and not plain.passed and plain.changed("loosened") == [name]
    assert accepted.status == PASS_LOOSENED and accepted.passed
    table = format_table(plain)
    assert "LOOSENED" in table and "verdict: FAIL" in table and "--accept-loosened-bounds" in table
    assert "verdict: PASS with loosened bounds" in format_table(accepted)
    d = accepted.to_dict()
    assert d["preset_bounds"] == PRESET_BOUNDS and d["loosened"] == [name] and d["status"] == PASS_LOOSENED
    row = next(b for b in d["bounds"] if b["name"] == name)
    assert row["change"] == "loosened" and row["preset"] == PRESET_BOUNDS[name]
    # the report's verdict card says it too
    ctx = verdict_context({"verdict": d})
    assert ctx["overall"] == PASS_LOOSENED and any(b["change"] == "loosened" for b in ctx["bounds"])


def test_a_tightened_bound_is_fine():
    bounds = dict(PRESET_BOUNDS)
    bounds["max_kl"] = PRESET_BOUNDS["max_kl"] / 2
    v = judged(passing_results(bounds), bounds)
    assert v.status == PASS and v.changed("tightened") == ["max_kl"]


def test_a_removed_bound_and_zero_bounds_fail_even_when_accepted():
    bounds = {k: v for k, v in PRESET_BOUNDS.items() if k != "max_kl"}
    v = judged(passing_results(bounds), bounds, accept_loosened=True)
    assert v.status == FAIL and v.changed("removed") == ["max_kl"]
    assert judged(passing_results(PRESET_BOUNDS), {}, accept_loosened=True).status == FAIL
    none = judge(passing_results(PRESET_BOUNDS), {}, {})
    assert none.status == FAIL and "no bounds" in none.reasons[0]


def test_a_resumed_run_takes_its_bounds_from_the_preset_not_from_an_edited_config_yaml(tmp_path):
    cfg = tiny()
    cfg.save(tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    data["thresholds"] = {}  # the issue's edit of an interrupted run
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    said = []
    resumed = rundir.resumed_config(tmp_path, [], said.append)
    assert resumed.thresholds == load_bounds(PRESET)
    assert any("not from config.yaml" in line for line in said)
    tighter = PRESET_BOUNDS["max_kl"] / 2
    again = rundir.resumed_config(tmp_path, [f"thresholds.max_kl={tighter}"], said.append)
    assert again.thresholds["max_kl"] == tighter


# ------------------------------------------------------------------------------------------ 4. evidence

def test_too_few_prompts_or_resamples_is_not_enough_evidence():
    """The issue's eval.num_samples=3 eval.bootstrap_resamples=1: every bound met, the verdict still fails."""
    results = passing_results(PRESET_BOUNDS)
    results["metrics"]["comparison"].update(num_prompts=3, bootstrap_resamples=1)
    v = judged(results, PRESET_BOUNDS)
    assert v.status == FAIL and all(b.passed for b in v.bounds)
    assert [e["check"] for e in v.evidence if not e["passed"]] == ["min_num_samples", "min_bootstrap_resamples"]
    assert "not enough evidence: eval.num_samples gave 3" in format_table(v)


def test_a_limit_below_the_minimum_detectable_improvement_fails_as_not_enough_evidence():
    results = passing_results(PRESET_BOUNDS)
    name = "min_improvement"  # a powered bound whose tiny limit lies above 0
    results["metrics"]["comparison"][POWERED_BOUNDS[name][-1]] = PRESET_BOUNDS[name] * 2
    v = judged(results, PRESET_BOUNDS)
    row = next(b for b in v.bounds if b.name == name)
    assert v.status == FAIL and not row.passed and row.reason.startswith("not enough evidence")
    assert lookup(results["metrics"], BOUNDS[name][0]) > row.bound  # its measurement alone would have passed it
    assert "(not enough evidence)" in format_table(v)


def test_the_presets_ask_for_no_less_evidence_than_they_evaluate():
    for preset in ("tiny", "flan-t5-base", "flan-t5-small", "flan-t5-large"):
        cfg, least = load_config(preset), load_evidence(preset)
        assert set(least) == {"min_num_samples", "min_bootstrap_resamples"}
        assert cfg.eval.bootstrap_resamples >= least["min_bootstrap_resamples"]
        assert cfg.eval.num_samples is None or cfg.eval.num_samples >= least["min_num_samples"]


def test_a_short_evaluation_is_warned_about_before_it_runs():
    said = []
    cfg = tiny("eval.num_samples=3", "eval.bootstrap_resamples=1", "thresholds.max_kl=1e9")
    check_verdict_settings(cfg, concrete(cfg), False, said.append)
    text = "\n".join(said)
    assert "eval.num_samples=3" in text and "eval.bootstrap_resamples=1" in text and "max_kl is loosened" in text


# ------------------------------------------------------------------------------------------ 5. train/test overlap

def test_test_dialogues_seen_in_training_are_removed_and_counted(corpus, tmp_path, t5_tokenizer):
    rows = copy.deepcopy(corpus["train"][:100])
    cfg = DataConfig(path=str(tmp_path), max_prompt_tokens=10_000, min_chars=0, max_chars=100_000)
    # the last 20% are the test split: make 5 of them training dialogues with another case, spacing, punctuation
    n_test = 20
    train_rows = rows[: len(rows) - n_test]
    for i, src in enumerate(train_rows[:5]):
        twin = dict(rows[len(rows) - n_test + i])
        twin["dialogue"] = "  " + src["dialogue"].upper().replace(".", " .") + " "
        rows[len(rows) - n_test + i] = twin
    with open(tmp_path / "train.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    data = build_prompts(cfg, t5_tokenizer)
    assert data.stats["test_overlap_removed"] == 5 and data.stats["test"] == n_test - 5 == len(data.test)
    kept, removed = without_training_dialogues(data.train, data.test)
    assert removed == 0 and len(kept) == len(data.test)
