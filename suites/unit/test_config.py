"""Configuration: presets, YAML, overrides, validation messages."""

from __future__ import annotations

import pytest

from harness.config import PRESETS, load_config, parse_override
from harness.errors import ConfigError
from harness.thresholds import BOUNDS, load_bounds


def test_reference_preset_matches_the_reference_notebook():
    cfg = load_config("flan-t5-base")
    assert cfg.policy.model == "google/flan-t5-base"
    assert (cfg.policy.lora_r, cfg.policy.lora_alpha, cfg.policy.lora_target_modules) == (32, 32, ["q", "v"])
    assert cfg.policy.lora_dropout == 0.05
    assert cfg.reward.model == "facebook/roberta-hate-speech-dynabench-r4-target"
    assert cfg.reward.label == "nothate" and cfg.reward.toxic_label == "hate"
    assert cfg.data.path == "knkarthick/dialogsum"
    assert (cfg.data.min_chars, cfg.data.max_chars, cfg.data.test_fraction, cfg.data.seed) == (200, 1000, 0.2, 42)
    p = cfg.ppo
    assert (p.learning_rate, p.batch_size, p.mini_batch_size, p.ppo_epochs) == (1.41e-5, 16, 4, 1)
    assert (p.init_kl_coef, p.target, p.horizon, p.gamma, p.lam) == (0.2, 6.0, 10000.0, 1.0, 0.95)
    assert (p.cliprange, p.cliprange_value, p.vf_coef) == (0.2, 0.2, 0.1)
    g = cfg.generation
    assert (g.min_new_tokens, g.max_new_tokens, g.min_length, g.top_k, g.top_p) == (100, 400, 5, 0, 1.0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_loads_with_its_bounds(preset):
    cfg = load_config(preset)
    assert cfg.preset == preset
    assert cfg.thresholds == load_bounds(preset)
    assert set(cfg.thresholds) <= set(BOUNDS)


def test_overrides_yaml_and_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  batch_size: 64\n  mini_batch_size: 16\npolicy:\n  model: /models/t5\n")
    cfg = load_config("tiny", f, ["ppo.batch_size=32", "ppo.learning_rate=5e-4", "thresholds.max_kl=3"])
    assert cfg.ppo.batch_size == 32  # the override wins over the file
    assert cfg.ppo.mini_batch_size == 16  # the file wins over the preset
    assert cfg.policy.model == "/models/t5"
    assert cfg.ppo.learning_rate == pytest.approx(5e-4)  # YAML 1.1 would read "5e-4" as a string
    assert cfg.thresholds["max_kl"] == 3.0


def test_parse_override_types():
    assert parse_override("ppo.steps=3") == ("ppo.steps", 3)
    assert parse_override("policy.adapter=null") == ("policy.adapter", None)
    assert parse_override("policy.lora_target_modules=[q, v]") == ("policy.lora_target_modules", ["q", "v"])


@pytest.mark.parametrize("override,field,words", [
    ("ppo.batchsize=3", "ppo.batchsize", "ppo.batch_size"),
    ("ppo.learnig_rate=1", "ppo.learnig_rate", "ppo.learning_rate"),
    ("polcy.model=x", "polcy", "policy"),
    ("thresholds.max_kll=1", "thresholds.max_kll", "thresholds.max_kl"),
])
def test_unknown_keys_suggest_the_nearest(override, field, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    assert e.value.field == field
    assert words in str(e.value)


@pytest.mark.parametrize("override,field,accepted", [
    ("ppo.batch_size=30", "ppo.batch_size", "multiple of ppo.mini_batch_size"),
    ("ppo.learning_rate=0", "ppo.learning_rate", "> 0"),
    ("ppo.learning_rate=-1e-3", "ppo.learning_rate", "> 0"),
    ("ppo.mini_batch_size=0", "ppo.mini_batch_size", "> 0"),
    ("generation.max_new_tokens=32", "generation.max_new_tokens", "min_new_tokens"),
    ("data.max_chars=100", "data.max_chars", "data.min_chars"),
    ("data.prompt_template=hello", "data.prompt_template", "{dialogue}"),
    ("reward.input=dialogue", "reward.input", "query+response or response"),
    ("ppo.kl_penalty=js", "ppo.kl_penalty", "kl, abs, mse or full"),
    ("eval.num_samples=0", "eval.num_samples", "> 0"),
    ("ppo.steps=ten", "ppo.steps", "an integer"),
])
def test_bad_values_name_field_value_and_range(override, field, accepted):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    msg = str(e.value)
    assert e.value.field == field
    assert msg.startswith(field)
    assert accepted in msg
    assert repr(parse_override(override)[1]) in msg  # the bad value is quoted back


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError) as e:
        load_config("gpt-5")
    assert "flan-t5-base" in str(e.value) and "tiny" in str(e.value)


def test_effective_config_round_trips(tmp_path):
    from harness.config import config_from_dict

    cfg = load_config("tiny", overrides=["ppo.steps=7", "seed=3"])
    cfg.save(tmp_path / "config.yaml")
    import yaml

    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again.to_dict() == cfg.to_dict()
