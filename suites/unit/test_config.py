"""Configuration: presets, YAML, overrides, validation messages."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import yaml

from harness.config import (
    PRESETS,
    EvalConfig,
    RolloutConfig,
    SamplingConfig,
    config_from_dict,
    load_config,
    parse_override,
)
from harness.errors import ConfigError
from harness.thresholds import BOUNDS, load_bounds

REPO = Path(__file__).resolve().parents[2]
FX = REPO / "fixtures" / "parity"


def test_reference_preset_matches_the_reference_notebook():
    cfg = load_config("flan-t5-base")
    assert cfg.policy.model == "google/flan-t5-base"
    assert (cfg.policy.lora_r, cfg.policy.lora_alpha, cfg.policy.lora_target_modules) == (32, 32, ["q", "v"])
    assert cfg.reward.model == "facebook/roberta-hate-speech-dynabench-r4-target"
    assert cfg.reward.label == "nothate" and cfg.reward.toxic_label == "hate"
    assert cfg.data.path == "knkarthick/dialogsum"
    assert (cfg.data.min_chars, cfg.data.max_chars, cfg.data.test_fraction) == (200, 1000, 0.2)
    p = cfg.ppo
    assert (p.learning_rate, p.batch_size, p.mini_batch_size, p.ppo_epochs) == (1.41e-5, 16, 4, 1)
    assert (p.init_kl_coef, p.target, p.horizon, p.gamma, p.lam) == (0.2, 6.0, 10000.0, 1.0, 0.95)
    assert (p.cliprange, p.cliprange_value, p.vf_coef) == (0.2, 0.2, 0.1)
    r = cfg.rollout  # LengthSampler(100, 400); min_length=5 on T5 = 4 new tokens before EOS
    assert (r.length_min, r.length_max, r.min_new_tokens, r.top_k, r.top_p, r.do_sample) == (100, 400, 4, 0, 1.0, True)
    e = cfg.eval  # max_new_tokens=100, sampling with top_k=0, top_p=1.0
    assert (e.max_new_tokens, e.min_new_tokens, e.top_k, e.top_p, e.do_sample) == (100, 0, 0, 1.0, True)


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


# ------------------------------------------------------------------------------------ overrides typed by the field

@pytest.mark.parametrize("override,key,value", [
    ("output.run_id=2026", "output.run_id", "2026"),  # a str field keeps the text (YAML would give an int)
    ("policy.model=yes", "policy.model", "yes"),  # (YAML 1.1 would give True)
    ("data.split=1.0", "data.split", "1.0"),
    ("policy.model= spaced ", "policy.model", " spaced "),  # the text as given
    ("ppo.max_grad_norm=null", "ppo.max_grad_norm", None),  # float | None
    ("ppo.max_grad_norm=None", "ppo.max_grad_norm", None),
    ("reward.max_length=none", "reward.max_length", None),  # int | None
    ("output.run_id=null", "output.run_id", None),  # str | None
    ("ppo.max_grad_norm=2", "ppo.max_grad_norm", 2.0),
    ("reward.max_length=128", "reward.max_length", 128),
    ("ppo.learning_rate=5e-4", "ppo.learning_rate", 5e-4),  # YAML 1.1 reads "5e-4" as a string
    ("ppo.learning_rate=1", "ppo.learning_rate", 1.0),
    ("ppo.batch_size=+32", "ppo.batch_size", 32),
    ("seed=7", "seed", 7),
    ("policy.trust_remote_code=true", "policy.trust_remote_code", True),
    ("policy.use_lora=False", "policy.use_lora", False),
    ("policy.lora_target_modules=q,k, v", "policy.lora_target_modules", ["q", "k", "v"]),
    ("policy.lora_target_modules=[q, 'k']", "policy.lora_target_modules", ["q", "k"]),
    ("policy.lora_target_modules=[1, yes]", "policy.lora_target_modules", ["1", "yes"]),  # strings, as typed
    ("thresholds.max_kl=3", "thresholds.max_kl", 3.0),
    ("no_such.key=3", "no_such.key", "3"),  # unknown: the text, for load_config to reject with a suggestion
])
def test_overrides_are_parsed_by_the_declared_field_type(override, key, value):
    got_key, got = parse_override(override)
    assert got_key == key
    assert got == value and type(got) is type(value)


def test_typed_overrides_reach_the_config():
    cfg = load_config("tiny", overrides=["output.run_id=2026", "policy.model=yes", "ppo.max_grad_norm=null",
                                         "ppo.learning_rate=5e-4", "thresholds.max_kl=3"])
    assert cfg.output.run_id == "2026"
    assert cfg.policy.model == "yes"
    assert load_config("tiny").ppo.max_grad_norm == 1.0 and cfg.ppo.max_grad_norm is None
    assert cfg.ppo.learning_rate == 5e-4 and isinstance(cfg.ppo.learning_rate, float)
    assert cfg.thresholds["max_kl"] == 3.0 and isinstance(cfg.thresholds["max_kl"], float)


@pytest.mark.parametrize("override,field,accepted", [
    ("ppo.batch_size=abc", "ppo.batch_size", "an integer"),
    ("ppo.steps=ten", "ppo.steps", "an integer"),
    ("ppo.batch_size=8.5", "ppo.batch_size", "an integer"),
    ("ppo.batch_size=null", "ppo.batch_size", "an integer"),  # not optional
    ("reward.max_length=long", "reward.max_length", "an integer or null"),
    ("ppo.learning_rate=fast", "ppo.learning_rate", "a number"),
    ("ppo.learning_rate=", "ppo.learning_rate", "a number"),
    ("ppo.learning_rate=nan", "ppo.learning_rate", "a finite number"),
    ("ppo.max_grad_norm=inf", "ppo.max_grad_norm", "a finite number (not inf or nan) or null"),
    ("policy.use_lora=maybe", "policy.use_lora", "true or false"),
    ("policy.use_lora=2", "policy.use_lora", "true or false"),
    ("policy.lora_target_modules=[q, [v]]", "policy.lora_target_modules", "a list of strings"),
    ("thresholds.max_kl=low", "thresholds.max_kl", "a number"),
])
def test_an_override_that_does_not_parse_as_its_type_names_the_field(override, field, accepted):
    raw = override.split("=", 1)[1]
    for call in (lambda: parse_override(override), lambda: load_config("tiny", overrides=[override])):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert e.value.field == field
        assert msg.startswith(f"{field}: got {raw!r}, accepted: {accepted}"), msg


def test_a_yaml_file_number_for_a_string_field_says_to_quote_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("output:\n  run_id: 2026\n")
    with pytest.raises(ConfigError) as e:
        load_config("tiny", f)
    assert e.value.field == "output.run_id" and "quote" in str(e.value)
    f.write_text("output:\n  run_id: '2026'\n")
    assert load_config("tiny", f).output.run_id == "2026"


# ------------------------------------------------------------------------------------ removed and renamed keys

OLD_SAVED = {"policy": {"lora_dropout": 0.05}, "data": {"seed": 42}, "generation": {"min_length": 5}}


@pytest.mark.parametrize("key", ["policy.lora_dropout", "policy.value_head_dropout"])
def test_dropout_keys_are_gone_with_a_reason(tmp_path, key):
    section, name = key.split(".")
    f = tmp_path / "old.yaml"
    f.write_text(f"{section}:\n  {name}: 0.1\n")
    saved = load_config("tiny").to_dict()
    saved[section][name] = 0.0
    for call in (lambda: load_config("tiny", overrides=[f"{key}=0.1"]), lambda: load_config("tiny", f),
                 lambda: config_from_dict(saved)):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert e.value.field == key
        assert "unknown key" in msg and "dropout" in msg and "eval mode" in msg and "docs/ppo.md" in msg, msg


@pytest.mark.parametrize("key,words", [
    ("data.seed", "does not shuffle"),
    ("generation", "'rollout'"),  # the old name of the rollout section
])
def test_other_removed_keys_say_what_became_of_them(key, words):
    section = key.split(".")[0]
    saved = load_config("tiny").to_dict()
    saved[section] = {**saved.get(section, {}), **OLD_SAVED[section]}
    with pytest.raises(ConfigError) as e:
        config_from_dict(saved)
    msg = str(e.value)
    assert e.value.field == key and "unknown key" in msg and words in msg, msg
    assert "eval mode" not in msg  # the dropout reason is for the dropout keys only


def test_an_adapter_saved_with_dropout_is_loaded_without_it(tmp_path):
    """The reference's adapter has lora_dropout 0.05: loaded, its dropout modules are the identity."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from harness.config import PolicyConfig
    from harness.models import load_policy

    d = tmp_path / "adapter"
    shutil.copytree(FX / "adapter", d)
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 0.5}))

    def dropouts(model) -> list:
        return [m for module in model.modules() if isinstance(getattr(module, "lora_dropout", None),
                                                              torch.nn.ModuleDict)
                for m in module.lora_dropout.values()]

    # precondition: peft alone builds real dropout from that file
    raw = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(FX / "model"), d, is_trainable=True)
    assert dropouts(raw) and all(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in dropouts(raw))
    policy = load_policy(PolicyConfig(model=str(FX / "model"), adapter=str(d), dtype="float32"))
    assert dropouts(policy.model) and all(isinstance(m, torch.nn.Identity) for m in dropouts(policy.model))
    fresh = load_policy(PolicyConfig(model=str(FX / "model"), dtype="float32", lora_r=2, lora_alpha=4))
    assert dropouts(fresh.model) and all(isinstance(m, torch.nn.Identity) for m in dropouts(fresh.model))
    assert list(policy.value_head.children()) == [policy.value_head.summary]  # no dropout in the value head


# ------------------------------------------------------------------------------------ sampling: one dataclass

def test_rollout_and_eval_share_one_sampling_dataclass():
    from harness.ppo.rollout import generate

    names = ["min_new_tokens", "top_k", "top_p", "temperature", "do_sample"]
    for section in (RolloutConfig(), EvalConfig()):
        assert isinstance(section, SamplingConfig)
        assert list(section.sampling_kwargs()) == names
    cfg = load_config("tiny", overrides=["rollout.temperature=0.7", "rollout.min_new_tokens=2",
                                         "eval.temperature=0.5", "eval.do_sample=false"])
    assert cfg.rollout.sampling_kwargs() == {"min_new_tokens": 2, "top_k": 0, "top_p": 1.0, "temperature": 0.7,
                                             "do_sample": True}
    assert cfg.eval.sampling_kwargs() == {"min_new_tokens": 0, "top_k": 0, "top_p": 1.0, "temperature": 0.5,
                                          "do_sample": False}
    params = inspect.signature(generate).parameters  # generate(..., **cfg.rollout.sampling_kwargs()) works
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in names)


@pytest.mark.parametrize("section", ["rollout", "eval"])
@pytest.mark.parametrize("override,accepted", [
    ("min_new_tokens=-1", "an integer in [0, "),
    ("top_k=-1", "an integer >= 0"),
    ("top_p=0", "a number in (0, 1]"),
    ("top_p=1.5", "a number in (0, 1]"),
    ("temperature=0", "a number > 0"),
    ("top_k=5", "top-k filtering would sample from another distribution"),
    ("top_p=0.9", "nucleus filtering would sample from another distribution"),
])
def test_sampling_fields_are_validated_alike_in_both_sections(section, override, accepted):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[f"{section}.{override}"])
    field = f"{section}.{override.split('=')[0]}"
    assert e.value.field == field and accepted in str(e.value)


@pytest.mark.parametrize("override,field,limit", [
    ("rollout.min_new_tokens=48", "rollout.min_new_tokens", "rollout.length_max - 1 = 47"),  # tiny: [32, 48)
    ("eval.min_new_tokens=49", "eval.min_new_tokens", "eval.max_new_tokens = 48"),
])
def test_min_new_tokens_may_not_pass_the_longest_response(override, field, limit):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=[override])
    assert e.value.field == field and limit in str(e.value)
    ok = override.replace("48", "47").replace("49", "48")
    load_config("tiny", overrides=[ok])  # the longest response itself is allowed (no EOS at all)


def test_the_rollout_default_is_the_references_min_length_5_on_t5(monkeypatch):
    """transformers' min_length counts T5's decoder start token: min_length=5 is 4 new tokens before EOS.

    With EOS pushed far above every other token, a response stops as soon as EOS is allowed: through
    transformers with the reference's min_length=5, and through the harness's generate with the rollout's
    sampling settings, the first EOS is the 5th new token.
    """
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    from harness.ppo.rollout import generate

    tok = AutoTokenizer.from_pretrained(FX / "model")
    model = AutoModelForSeq2SeqLM.from_pretrained(FX / "model").eval()

    class PushEos(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores + 1e4 * (torch.arange(scores.shape[-1]) == tok.eos_token_id)

    prompts = [[5, 6, 7, 1], [9, 10, 11, 12, 13, 1]]
    reference = model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=20, do_sample=False,
                               min_length=5, logits_processor=LogitsProcessorList([PushEos()]))
    assert reference[0, 1:].tolist().index(tok.eos_token_id) == 4  # the 5th new token (start token dropped)

    # the same push inside the model (its output layer), so that both of the harness's decoding paths see it
    hook = model.lm_head.register_forward_hook(
        lambda module, args, out: out + 1e4 * (torch.arange(out.shape[-1]) == tok.eos_token_id))
    try:
        for decoder in ("loop", "generate"):
            roll = generate(model, tok, prompts, max_new_tokens=20, seeds=[0, 1], decoder=decoder,
                            **RolloutConfig().sampling_kwargs())
            assert [r.tolist().index(tok.eos_token_id) for r in roll.responses] == [4, 4], decoder
            assert roll.lengths == [5, 5]
            no_min = generate(model, tok, prompts, max_new_tokens=20, seeds=[0, 1], decoder=decoder,
                              **{**RolloutConfig().sampling_kwargs(), "min_new_tokens": 0})
            assert no_min.lengths == [1, 1]  # precondition: without the minimum, EOS comes first
    finally:
        hook.remove()


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
    ("rollout.length_max=32", "rollout.length_max", "rollout.length_min = 32"),
    ("data.max_chars=100", "data.max_chars", "data.min_chars"),
    ("data.prompt_template=hello", "data.prompt_template", "{dialogue}"),
    ("reward.input=dialogue", "reward.input", "query+response or response"),
    ("ppo.kl_penalty=js", "ppo.kl_penalty", "kl, abs, mse or full"),
    ("eval.num_samples=0", "eval.num_samples", "> 0"),
    ("sft.lr_scheduler=onecycle", "sft.lr_scheduler", "linear, cosine"),
    ("sft.warmup=1.5", "sft.warmup", "a ratio in [0, 1) or a whole number of steps"),
    ("sft.steps=0", "sft.steps", "> 0"),
    ("sft.validation_rows=0", "sft.validation_rows", "null for the whole split"),
    ("sft.eval_every=-1", "sft.eval_every", ">= 0"),
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
    cfg = load_config("tiny", overrides=["ppo.steps=7", "seed=3", "output.run_id=2026", "rollout.temperature=0.7"])
    cfg.save(tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again.to_dict() == cfg.to_dict()


def test_a_new_preset_is_a_file(tmp_path, monkeypatch):
    """Presets are data (harness/presets/<name>.yaml): a file that names its base and what it changes is a preset;
    a base that is unknown or circular is refused naming the file."""
    import shutil

    from harness import config

    presets = tmp_path / "presets"
    shutil.copytree(config.PRESETS_DIR, presets)
    (presets / "nightly.yaml").write_text("base: tiny\nppo:\n  steps: 3\n")
    (presets / "loop-a.yaml").write_text("base: loop-b\n")
    (presets / "loop-b.yaml").write_text("base: loop-a\n")
    monkeypatch.setattr(config, "PRESETS_DIR", presets)
    monkeypatch.setattr(config, "PRESETS", {"nightly": config._read_preset("nightly"),
                                            **{n: config._read_preset(n) for n in ("tiny", "flan-t5-base")}})
    cfg = config.load_config("nightly")
    tiny = config.load_config("tiny")
    assert cfg.ppo.steps == 3 and cfg.policy == tiny.policy and cfg.eval == tiny.eval
    assert "nightly" in config.preset_names()
    with pytest.raises(ConfigError, match="circular"):
        config._read_preset("loop-a")
