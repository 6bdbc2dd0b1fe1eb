"""The warm start's pieces that need no model: its bound, its cache key, its inputs (issue 13)."""

from __future__ import annotations

import pytest

from harness.config import load_config
from harness.sft import Pairs, latest_checkpoint, read_result
from harness.thresholds import SFT_BOUNDS, verdict


def local_config(*overrides: str):
    # no tiny:// location: sft_settings must not build the tiny world for a unit test
    return load_config("tiny", overrides=["policy.model=/models/t5", "data.path=/data/dialogsum", *overrides])


def test_the_sft_bound_is_judged_only_where_a_warm_start_ran():
    bounds = {"min_sft_rouge_l": 0.5, "max_kl": 5.0}
    assert {"min_sft_rouge_l", "min_sft_rouge_l_gain"} == set(SFT_BOUNDS)
    plain = {"metrics": {"after": {"kl_per_sequence_mean": 1.0}}}
    assert [b.name for b in verdict(plain, bounds)] == ["max_kl"]  # a run without SFT is not failed by it
    low = {"metrics": {"after": {"kl_per_sequence_mean": 1.0}, "sft": {"rougeL": 0.49, "loss": 1.0}}}
    judged = {b.name: b.passed for b in verdict(low, bounds)}
    assert judged == {"min_sft_rouge_l": False, "max_kl": True}
    missing = {"metrics": {"sft": {"rougeL": None, "loss": None}}}
    assert not verdict(missing, {"min_sft_rouge_l": 0.5})[0].passed  # a warm start without a figure fails


def test_every_preset_bounds_its_warm_start():
    for preset in ("tiny", "flan-t5-base", "flan-t5-small", "flan-t5-large"):
        bounds = load_config(preset).thresholds
        assert {"min_sft_rouge_l", "min_sft_rouge_l_gain"} <= set(bounds), preset


def test_the_cache_key_follows_every_setting_the_adapter_depends_on():
    from harness.plan import sft_cache_dir

    base = sft_cache_dir(local_config())
    assert base == sft_cache_dir(local_config())  # the same settings find the same adapter
    assert base.name.startswith("tiny-")
    for change in ("sft.steps=7", "sft.learning_rate=0.01", "policy.lora_r=4", "seed=3", "data.max_rows=50",
                   "policy.model=/models/other", "data.prompt_template=Sum: {dialogue}"):
        assert sft_cache_dir(local_config(change)) != base, change
    # settings PPO alone reads do not make a new warm start
    assert sft_cache_dir(local_config("ppo.steps=3", "eval.num_samples=8", "reward.batch_size=4")) == base


def test_pairs_need_a_target_per_prompt():
    pairs = Pairs([[1, 2], [3]], ["a b", "c"])
    assert len(pairs) == 2 and pairs.references == [["a b"], ["c"]]
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        Pairs([[1], [2]], ["x"])


def test_latest_checkpoint_and_an_unfinished_directory(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    for step in (5, 40, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-40"
    assert read_result(tmp_path) is None  # no sft.json: not a finished warm start
    (tmp_path / "sft.json").write_text("{broken")
    assert read_result(tmp_path) is None


def test_a_warm_start_refuses_a_full_fine_tuning_policy():
    from harness.errors import HarnessError
    from harness.plan import plan_sft

    with pytest.raises(HarnessError, match="policy.use_lora"):  # refused by the plan, before anything loads
        plan_sft(local_config("policy.use_lora=false"), echo=lambda *_: None)
