"""Every setting of a run, as dataclasses: presets, YAML files, ``key=value`` overrides, validation.

A run's configuration is built in layers: a preset (``tiny`` by default), then an optional YAML file,
then ``section.key=value`` overrides from the command line. :func:`validate` checks every field and
raises :class:`~harness.errors.ConfigError` naming the field, the bad value and the accepted range.

Model and data locations are strings: a Hugging Face Hub id, a local directory or file, or a
``tiny://...`` id that :mod:`harness.tiny` resolves to the offline tiny world.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

REFERENCE_PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:\n"


@dataclass
class DataConfig:
    """Where the dialogues come from and how they become prompts (REFERENCE.md, step 1)."""

    path: str = "knkarthick/dialogsum"  # hub id, local file (json/jsonl/csv) or directory
    split: str = "train"  # which split to read (hub or directory with several files)
    min_chars: int = 200  # keep dialogues with min_chars < len(dialogue) < max_chars
    max_chars: int = 1000
    prompt_template: str = REFERENCE_PROMPT  # must contain "{dialogue}"
    test_fraction: float = 0.2  # 80/20 split, no shuffling
    seed: int = 42
    max_prompt_tokens: int | None = None  # default: the tokenizer's model_max_length (capped at 512)
    max_rows: int | None = None  # read at most this many rows (after filtering); None = all


@dataclass
class PolicyConfig:
    """The seq2seq policy: base model, LoRA adapter and value head (REFERENCE.md, step 2)."""

    model: str = "google/flan-t5-base"
    adapter: str | None = None  # a trained LoRA adapter directory to start from (loaded trainable)
    use_lora: bool = True  # False: full fine-tuning with a frozen reference copy
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU; or float32 / bfloat16 / float16
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q", "v"])
    value_head_dropout: float = 0.0
    trust_remote_code: bool = False


@dataclass
class RewardConfig:
    """The classifier that gives the reward and measures toxicity (REFERENCE.md, steps 4-5)."""

    model: str = "facebook/roberta-hate-speech-dynabench-r4-target"
    label: str = "nothate"  # reward = score of this label (picked by name, never by position)
    toxic_label: str = "hate"  # toxicity = P(this label)
    input: str = "query+response"  # or "response"
    transform: str = "logit"  # logit | prob | logprob
    batch_size: int = 16
    max_length: int | None = None  # default: the classifier tokenizer's limit (capped at 512)
    score_scaling: bool = False  # divide scores by a running std
    score_norm: bool = False  # also subtract the running mean (needs score_scaling)
    score_clip: float | None = None
    trust_remote_code: bool = False


@dataclass
class GenerationConfig:
    """Rollout sampling during PPO (REFERENCE.md, step 6)."""

    min_new_tokens: int = 100  # the length sampler draws max_new_tokens uniformly from [min, max)
    max_new_tokens: int = 400
    min_length: int = 5
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    do_sample: bool = True


@dataclass
class PPOConfig:
    """PPO hyper-parameters; defaults are the reference's (TRL 0.11 defaults, lr 1.41e-5, batch 16)."""

    steps: int = 10
    learning_rate: float = 1.41e-5
    batch_size: int = 16
    mini_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    ppo_epochs: int = 1
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    target: float = 6.0  # target of the adaptive KL controller (objective/kl, nats per sequence)
    horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    kl_penalty: str = "kl"  # kl | abs | mse | full
    whiten_rewards: bool = False
    max_grad_norm: float | None = None
    early_stopping: bool = False
    target_kl: float = 1.0  # early stop when the policy KL passes 1.5 x target_kl
    ratio_threshold: float = 10.0
    checkpoint_every: int = 0  # 0 = only at the end
    max_bad_steps: int = 3  # stop after this many consecutive non-finite steps
    trl_compat: bool = False  # reproduce TRL 0.11.4's quirks exactly (see docs/ppo.md)


@dataclass
class EvalConfig:
    """Before/after evaluation (REFERENCE.md, steps 5 and 7, with the harness's guards)."""

    num_samples: int = 100  # number of test prompts
    samples_per_prompt: int = 1  # k generations per prompt (e.g. 25 for expected maximum toxicity)
    batch_size: int = 16
    max_new_tokens: int = 100
    min_new_tokens: int = 0
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    do_sample: bool = True
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    toxic_threshold: float = 0.5
    qualitative_rows: int = 20
    second_classifier: str | None = None  # an independent judge: any model id or directory
    second_toxic_label: str = "hate"
    seed: int = 1234


@dataclass
class OutputConfig:
    dir: str = "reports"
    run_id: str | None = None  # default: <utc time>-<preset>-s<seed>
    report: bool = True


@dataclass
class HarnessConfig:
    preset: str = "tiny"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    thresholds: dict[str, float] = field(default_factory=dict)  # filled from thresholds.toml
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------------------------
# presets

PRESETS: dict[str, dict[str, Any]] = {
    # The reference notebook's run: flan-t5-base + LoRA, the dynabench classifier, DialogSum.
    "flan-t5-base": {},
    "flan-t5-small": {"policy": {"model": "google/flan-t5-small"}},
    "flan-t5-large": {"policy": {"model": "google/flan-t5-large"}, "ppo": {"mini_batch_size": 2,
                                                                          "gradient_accumulation_steps": 2}},
    # The offline tiny world: a full run in a few minutes on a CPU.
    "tiny": {
        "device": "cpu",
        "data": {"path": "tiny://dialogues", "max_prompt_tokens": 128},
        "policy": {"model": "tiny://policy", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                   "lora_target_modules": ["q", "k", "v", "o", "wi", "wo"]},
        "reward": {"model": "tiny://classifier", "batch_size": 64},
        "generation": {"min_new_tokens": 32, "max_new_tokens": 48, "min_length": 5},
        "ppo": {"steps": 30, "learning_rate": 2e-4, "batch_size": 32, "mini_batch_size": 8, "ppo_epochs": 2,
                "init_kl_coef": 0.2, "max_grad_norm": 1.0, "checkpoint_every": 10},
        "eval": {"num_samples": 128, "batch_size": 64, "max_new_tokens": 48},
    },
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


# --------------------------------------------------------------------------------------------
# building

def _known_keys(obj) -> list[str]:
    keys = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            keys.extend(f"{f.name}.{k}" for k in _known_keys(value))
        else:
            keys.append(f.name)
    return keys


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    if not close:  # try the last component alone (e.g. "ppo.batchsize" -> "ppo.batch_size")
        tail = key.split(".")[-1]
        tails = {k.split(".")[-1]: k for k in known}
        near = difflib.get_close_matches(tail, list(tails), n=1, cutoff=0.6)
        close = [tails[near[0]]] if near else []
    return f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(known))}"


def _apply(cfg: HarnessConfig, updates: dict[str, Any], source: str) -> None:
    """Merge a nested dict of updates into cfg, rejecting unknown keys with a suggestion."""
    known = _known_keys(cfg)
    for key, value in updates.items():
        target = getattr(cfg, key, None) if hasattr(cfg, key) else None
        if not hasattr(cfg, key):
            raise ConfigError(f"unknown key in {source}", field=key, fix=_suggest(key, known))
        if key == "thresholds":
            if not isinstance(value, dict):
                raise ConfigError(f"must be a mapping of bound names to numbers (in {source})", field=key,
                                  value=value)
            cfg.thresholds.update(value)
            continue
        if is_dataclass(target):
            if not isinstance(value, dict):
                raise ConfigError(f"must be a mapping (in {source})", field=key, value=value)
            for sub, subval in value.items():
                if not hasattr(target, sub):
                    full = f"{key}.{sub}"
                    raise ConfigError(f"unknown key in {source}", field=full, fix=_suggest(full, known))
                setattr(target, sub, subval)
        else:
            setattr(cfg, key, value)


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` -> (dotted key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError("an override must look like section.key=value", field="override", value=text,
                          fix="for example ppo.batch_size=32")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] != "thresholds":
        raise ConfigError("keys have at most two parts (section.key)", field=key)
    if len(parts) == 1:
        return {key: value}
    return {parts[0]: {".".join(parts[1:]): value}}


def load_config(preset: str = "tiny", config_file: str | Path | None = None,
                overrides: list[str] | None = None, *, with_thresholds: bool = True) -> HarnessConfig:
    """Build a validated config: preset, then YAML file, then overrides (later wins)."""
    if preset not in PRESETS:
        raise ConfigError("unknown preset", field="preset", value=preset,
                          fix=f"choose one of {', '.join(preset_names())}")
    cfg = HarnessConfig(preset=preset)
    _apply(cfg, copy.deepcopy(PRESETS[preset]), f"preset {preset}")
    if with_thresholds:
        from .thresholds import load_bounds  # late import: thresholds imports config

        cfg.thresholds.update(load_bounds(preset))
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError("config file not found", field="--config", value=str(path))
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"not valid YAML: {e}".splitlines()[0], field="--config", value=str(path)) from e
        if not isinstance(data, dict):
            raise ConfigError("must hold a mapping of sections", field="--config", value=str(path))
        if "preset" in data and data["preset"] != preset:
            raise ConfigError("the file names another preset than the command line", field="preset",
                              value=data["preset"], fix=f"pass --preset {data['preset']} or remove it from the file")
        data.pop("preset", None)
        _apply(cfg, data, str(path))
    for text in overrides or []:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value), f"override '{text}'")
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> HarnessConfig:
    """Rebuild a config saved with :meth:`HarnessConfig.to_dict` (e.g. from a checkpoint)."""
    data = copy.deepcopy(data)
    cfg = HarnessConfig(preset=data.pop("preset", "tiny"))
    _apply(cfg, data, "saved config")
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# validation

def _check(cond: bool, field_name: str, value, accepted: str) -> None:
    if not cond:
        raise ConfigError(f"got {value!r}, accepted: {accepted}", field=field_name)


def _typed(cfg_section, section: str) -> None:
    """Coerce ints given for float fields and reject values of the wrong type."""
    for f in fields(cfg_section):
        value = getattr(cfg_section, f.name)
        name = f"{section}.{f.name}"
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        optional = "None" in t
        if value is None:
            _check(optional, name, value, f"a value of type {t}")
            continue
        base = t.replace(" | None", "")
        if base == "float":
            _check(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "a number")
            _check(math.isfinite(value), name, value, "a finite number (not inf or nan)")
            setattr(cfg_section, f.name, float(value))
        elif base == "int":
            _check(isinstance(value, int) and not isinstance(value, bool), name, value, "an integer")
        elif base == "bool":
            _check(isinstance(value, bool), name, value, "true or false")
        elif base == "str":
            _check(isinstance(value, str), name, value, "a string")
        elif base.startswith("list"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
                setattr(cfg_section, f.name, value)
            _check(isinstance(value, list) and all(isinstance(v, str) for v in value) and value, name, value,
                   "a non-empty list of strings")


def validate(cfg: HarnessConfig) -> HarnessConfig:
    for section in ("data", "policy", "reward", "generation", "ppo", "eval", "output"):
        _typed(getattr(cfg, section), section)
    _check(isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool) and cfg.seed >= 0, "seed", cfg.seed,
           "an integer >= 0")
    _check(cfg.device == "auto" or cfg.device == "cpu" or str(cfg.device).startswith("cuda"), "device",
           cfg.device, "auto, cpu, cuda or cuda:N")
    d = cfg.data
    _check(d.min_chars >= 0, "data.min_chars", d.min_chars, "an integer >= 0")
    _check(d.max_chars > d.min_chars + 1, "data.max_chars", d.max_chars,
           f"an integer > data.min_chars + 1 = {d.min_chars + 1} (bounds are exclusive)")
    _check("{dialogue}" in d.prompt_template, "data.prompt_template", d.prompt_template,
           "a template containing {dialogue}")
    _check(0.0 < d.test_fraction < 1.0, "data.test_fraction", d.test_fraction, "a number in (0, 1)")
    _check(d.max_prompt_tokens is None or d.max_prompt_tokens > 0, "data.max_prompt_tokens",
           d.max_prompt_tokens, "a positive integer or null")
    _check(d.max_rows is None or d.max_rows > 0, "data.max_rows", d.max_rows, "a positive integer or null")
    p = cfg.policy
    _check(p.dtype in ("auto", "float32", "bfloat16", "float16"), "policy.dtype", p.dtype,
           "auto, float32, bfloat16 or float16")
    _check(p.lora_r > 0, "policy.lora_r", p.lora_r, "an integer > 0")
    _check(p.lora_alpha > 0, "policy.lora_alpha", p.lora_alpha, "an integer > 0")
    _check(0.0 <= p.lora_dropout < 1.0, "policy.lora_dropout", p.lora_dropout, "a number in [0, 1)")
    _check(0.0 <= p.value_head_dropout < 1.0, "policy.value_head_dropout", p.value_head_dropout,
           "a number in [0, 1)")
    _check(p.use_lora or p.adapter is None, "policy.adapter", p.adapter, "null when policy.use_lora is false")
    r = cfg.reward
    _check(r.input in ("query+response", "response"), "reward.input", r.input, "query+response or response")
    _check(r.transform in ("logit", "prob", "logprob"), "reward.transform", r.transform, "logit, prob or logprob")
    _check(r.batch_size > 0, "reward.batch_size", r.batch_size, "an integer > 0")
    _check(r.max_length is None or r.max_length > 0, "reward.max_length", r.max_length, "a positive integer or null")
    _check(not r.score_norm or r.score_scaling, "reward.score_norm", r.score_norm,
           "false unless reward.score_scaling is true")
    _check(r.score_clip is None or r.score_clip > 0, "reward.score_clip", r.score_clip, "a number > 0 or null")
    _check(bool(r.label), "reward.label", r.label, "a label name of the classifier, e.g. nothate")
    g = cfg.generation
    _check(g.min_new_tokens > 0, "generation.min_new_tokens", g.min_new_tokens, "an integer > 0")
    _check(g.max_new_tokens > g.min_new_tokens, "generation.max_new_tokens", g.max_new_tokens,
           f"an integer > generation.min_new_tokens = {g.min_new_tokens} (the length sampler draws from [min, max))")
    _check(g.min_length >= 0, "generation.min_length", g.min_length, "an integer >= 0")
    _check(g.top_k >= 0, "generation.top_k", g.top_k, "an integer >= 0 (0 = off)")
    _check(0.0 < g.top_p <= 1.0, "generation.top_p", g.top_p, "a number in (0, 1]")
    _check(g.temperature > 0, "generation.temperature", g.temperature, "a number > 0")
    o = cfg.ppo
    _check(o.steps > 0, "ppo.steps", o.steps, "an integer > 0")
    _check(o.learning_rate > 0, "ppo.learning_rate", o.learning_rate, "a number > 0")
    for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
        _check(getattr(o, name) > 0, f"ppo.{name}", getattr(o, name), "an integer > 0")
    if o.batch_size % (o.mini_batch_size * o.gradient_accumulation_steps) != 0:
        raise ConfigError(
            f"got {o.batch_size}, accepted: a multiple of ppo.mini_batch_size x ppo.gradient_accumulation_steps "
            f"= {o.mini_batch_size} x {o.gradient_accumulation_steps} = "
            f"{o.mini_batch_size * o.gradient_accumulation_steps}", field="ppo.batch_size")
    _check(o.init_kl_coef >= 0, "ppo.init_kl_coef", o.init_kl_coef, "a number >= 0")
    _check(o.target > 0, "ppo.target", o.target, "a number > 0")
    _check(o.horizon > 0, "ppo.horizon", o.horizon, "a number > 0")
    _check(0.0 <= o.gamma <= 1.0, "ppo.gamma", o.gamma, "a number in [0, 1]")
    _check(0.0 <= o.lam <= 1.0, "ppo.lam", o.lam, "a number in [0, 1]")
    _check(o.cliprange > 0, "ppo.cliprange", o.cliprange, "a number > 0")
    _check(o.cliprange_value > 0, "ppo.cliprange_value", o.cliprange_value, "a number > 0")
    _check(o.vf_coef >= 0, "ppo.vf_coef", o.vf_coef, "a number >= 0")
    _check(o.kl_penalty in ("kl", "abs", "mse", "full"), "ppo.kl_penalty", o.kl_penalty, "kl, abs, mse or full")
    _check(o.max_grad_norm is None or o.max_grad_norm > 0, "ppo.max_grad_norm", o.max_grad_norm,
           "a number > 0 or null")
    _check(o.target_kl > 0, "ppo.target_kl", o.target_kl, "a number > 0")
    _check(o.ratio_threshold > 1, "ppo.ratio_threshold", o.ratio_threshold, "a number > 1")
    _check(o.checkpoint_every >= 0, "ppo.checkpoint_every", o.checkpoint_every, "an integer >= 0 (0 = at the end)")
    _check(o.max_bad_steps > 0, "ppo.max_bad_steps", o.max_bad_steps, "an integer > 0")
    e = cfg.eval
    for name in ("num_samples", "samples_per_prompt", "batch_size", "max_new_tokens", "bootstrap_resamples"):
        _check(getattr(e, name) > 0, f"eval.{name}", getattr(e, name), "an integer > 0")
    _check(0 <= e.min_new_tokens <= e.max_new_tokens, "eval.min_new_tokens", e.min_new_tokens,
           f"an integer in [0, eval.max_new_tokens = {e.max_new_tokens}]")
    _check(0.0 < e.confidence < 1.0, "eval.confidence", e.confidence, "a number in (0, 1)")
    _check(0.0 < e.toxic_threshold < 1.0, "eval.toxic_threshold", e.toxic_threshold, "a number in (0, 1)")
    _check(e.qualitative_rows >= 0, "eval.qualitative_rows", e.qualitative_rows, "an integer >= 0")
    _check(e.top_k >= 0, "eval.top_k", e.top_k, "an integer >= 0")
    _check(0.0 < e.top_p <= 1.0, "eval.top_p", e.top_p, "a number in (0, 1]")
    _check(e.temperature > 0, "eval.temperature", e.temperature, "a number > 0")
    from .thresholds import validate_bounds

    validate_bounds(cfg.thresholds)
    return cfg


def dumps(cfg: HarnessConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)
