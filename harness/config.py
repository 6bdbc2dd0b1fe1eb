"""Every setting of a run, as dataclasses: presets, YAML files, ``key=value`` overrides, validation.

A run's configuration is built in layers: a preset (``tiny`` by default), then an optional YAML file,
then ``section.key=value`` overrides from the command line, each value parsed by the declared type of
its field (:func:`parse_override`). :func:`validate` checks every field and raises
:class:`~harness.errors.ConfigError` naming the field, the bad value and the accepted range.

Model and data locations are strings: a Hugging Face Hub id, a local directory or file, or a
``tiny://...`` id that :mod:`harness.tiny` resolves to the offline tiny world.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, brief, one_line
from .thresholds import load_bounds, validate_bounds

#: the experiment trackers output.report_to may name (harness/trackers.py)
TRACKERS = ("tensorboard", "mlflow")

REFERENCE_PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:\n"


@dataclass
class DataConfig:
    """Where the dialogues come from and how they become prompts (REFERENCE.md, step 1)."""

    path: str = "knkarthick/dialogsum"  # hub id, local file (json/jsonl/csv) or directory
    split: str = "train"  # which split to read (hub or directory with several files)
    min_chars: int = 200  # keep dialogues with min_chars < len(dialogue) < max_chars
    max_chars: int = 1000
    prompt_template: str = REFERENCE_PROMPT  # must contain "{dialogue}"
    test_fraction: float = 0.2  # 80/20 split, no shuffling (so no seed)
    max_prompt_tokens: int | None = None  # default: the tokenizer's model_max_length (capped at 512)
    max_rows: int | None = None  # read at most this many rows (after filtering); None = all


@dataclass
class PolicyConfig:
    """The seq2seq policy: base model, LoRA adapter and value head (REFERENCE.md, step 2).

    No dropout settings: every forward of a run is in eval mode, so a LoRA always has dropout 0 (a loaded
    adapter's dropout is replaced by the identity) and the value head has none (docs/ppo.md).
    """

    model: str = "google/flan-t5-base"
    adapter: str | None = None  # a trained LoRA adapter directory to start from (loaded trainable)
    # the KL penalty's reference when starting from an adapter: "start" = that adapter, frozen (PPO's KL is 0 at
    # step 0); "base" = the bare base model, every adapter off, as TRL 0.11.4 and the reference notebook did
    reference: str = "start"
    use_lora: bool = True  # False: full fine-tuning with a frozen reference copy
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU; or float32 / bfloat16 / float16
    lora_r: int = 32
    lora_alpha: int = 32
    lora_target_modules: list[str] = field(default_factory=lambda: ["q", "v"])
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
class SamplingConfig:
    """How responses are sampled; shared by the PPO rollout (``rollout``) and the evaluation (``eval``).

    :meth:`sampling_kwargs` gives these fields as keyword arguments of :func:`harness.ppo.rollout.generate`.
    """

    min_new_tokens: int = 0  # EOS is banned until a response has this many new tokens
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    temperature: float = 1.0
    do_sample: bool = True

    def sampling_kwargs(self) -> dict[str, Any]:
        """``{min_new_tokens, top_k, top_p, temperature, do_sample}``: pass as ``generate(..., **kwargs)``."""
        return {f.name: getattr(self, f.name) for f in fields(SamplingConfig)}


@dataclass
class RolloutConfig(SamplingConfig):
    """Rollout sampling during PPO (REFERENCE.md, step 6).

    Each row's ``max_new_tokens`` is drawn uniformly from ``[length_min, length_max)`` (the reference's
    ``LengthSampler(100, 400)``). ``min_new_tokens`` 4 is the reference's ``min_length=5``: for T5,
    transformers' ``min_length`` counts the decoder start token, so it bans EOS for the first 4 new tokens.
    """

    min_new_tokens: int = 4
    length_min: int = 100
    length_max: int = 400


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
class EvalConfig(SamplingConfig):
    """Before/after evaluation (REFERENCE.md, steps 5 and 7, with the harness's guards).

    Sampling (``min_new_tokens`` 0, ``top_k``, ``top_p``, ``temperature``, ``do_sample``) comes from
    :class:`SamplingConfig`; ``sampling_kwargs()`` plus ``max_new_tokens`` is the whole generation call.
    """

    num_samples: int | None = 100  # number of test prompts (the first N of the test split); null = all of them
    samples_per_prompt: int = 1  # k generations per prompt (e.g. 25 for expected maximum toxicity)
    batch_size: int = 16
    max_new_tokens: int = 100
    bootstrap_resamples: int = 9999  # BCa intervals: stable 2.5% tails need thousands of resamples
    confidence: float = 0.95
    toxic_threshold: float = 0.5
    qualitative_rows: int = 20
    # an independent judge, not the reward model (null: none): any model id or directory; unitary/toxic-bert is
    # a multi-label BERT trained on other data (Jigsaw), scored with a sigmoid per label
    second_classifier: str | None = "unitary/toxic-bert"
    second_toxic_label: str = "toxic"
    # the faithfulness judge (null: none): any NLI cross-encoder id or directory, reading (premise = the dialogue,
    # hypothesis = the summary); labels are read by name (entailment, contradiction). docs/evaluation.md
    faithfulness_model: str | None = "FacebookAI/roberta-large-mnli"
    faithful_threshold: float = 0.5  # a summary is faithful when its faithfulness is >= this
    faithfulness_batch_size: int = 16  # (window, sentence) pairs per forward pass of the faithfulness judge
    min_words: int = 3  # an output with fewer words is degenerate (so are outputs with no letter, "no no no")
    copy_threshold: float = 0.5  # an output copies the prompt when this share of its word 4-grams stand in it
    seed: int = 1234
    # the over-optimisation curve (docs/evaluation.md, "The curve"): every curve_every PPO steps (and at step 0 and
    # the last step) the policy is evaluated on the first curve_prompts test prompts (at most eval.num_samples),
    # one sample each, with the evaluation's seeds, by both judges; 0 = no curve
    curve_every: int = 2
    curve_prompts: int = 200


@dataclass
class SFTConfig:
    """The supervised warm start (``detox-harness sft``, ``run --sft``): LoRA instruction fine-tuning on
    (prompt -> reference summary) pairs with transformers' ``Seq2SeqTrainer`` (docs/sft.md).

    It trains on the PPO train part of ``data.split`` (the first 80%: the prompts PPO's evaluation uses are
    never seen) with the first reference summary as the target, and validates (loss and greedy ROUGE-L) on
    ``validation_split``. The adapter uses ``policy``'s LoRA settings; the prompt limit is ``data``'s.
    """

    steps: int = 1000  # optimizer steps
    batch_size: int = 8
    learning_rate: float = 1e-3
    lr_scheduler: str = "linear"  # a transformers SchedulerType: linear | cosine | constant | ...
    warmup: float = 0.0  # a ratio of the steps (< 1) or a number of steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_target_tokens: int = 128  # reference summaries are cut at this many tokens
    validation_split: str = "validation"
    validation_rows: int | None = 200  # the first N rows of validation_split (null: all)
    eval_every: int = 0  # validate every N steps (0: only at the end)
    checkpoint_every: int = 0  # a Trainer checkpoint every N steps for resume (0: only at the end)
    generation_max_new_tokens: int = 100  # greedy summaries for the validation ROUGE-L


@dataclass
class OutputConfig:
    dir: str = "reports"
    run_id: str | None = None  # default: <utc time>-<preset>-s<seed>
    report: bool = True
    # experiment trackers the finished run is exported to (harness/trackers.py; optional extras): tensorboard, mlflow
    report_to: list[str] | None = None


@dataclass
class HarnessConfig:
    preset: str = "tiny"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    thresholds: dict[str, float] = field(default_factory=dict)  # filled from thresholds.toml
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def locations(self) -> list[str | None]:
        """Every model and data location the config reads (hub ids, directories, files or tiny:// ids)."""
        return [self.data.path, self.policy.model, self.reward.model, self.eval.second_classifier,
                self.eval.faithfulness_model]

    def save(self, path: str | Path) -> None:
        """Write the config as YAML atomically (:func:`harness.files.atomic_write_text`): a full disk never leaves a
        truncated config.yaml that a later --resume would have to read."""
        from .files import atomic_write_text

        atomic_write_text(path, yaml.dump(self.to_dict(), Dumper=_PlainDumper, sort_keys=False))


# --------------------------------------------------------------------------------------------
# YAML settings files (--config, and a run's config.yaml read back on --resume)

#: a settings file is a page of text; anything bigger is not one (and is not parsed to find out)
MAX_SETTINGS_BYTES = 1 << 20
# YAML 1.1 (PyYAML) reads a float only with a dot, so 1e-3 would be the string "1e-3"; YAML 1.2 and the command
# line read it as a number, and so do settings files
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


class _Refused(yaml.YAMLError):
    """What :class:`SettingsLoader` will not read: ``key`` (dotted) and ``line`` say where."""

    def __init__(self, what: str, key: str, line: int, fix: str):
        super().__init__(what)
        self.what, self.key, self.line, self.fix = what, key, line, fix


class SettingsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, made strict for settings: an alias (``*name``) is refused where it stands, before
    anything is expanded (a "billion laughs" file is one line of error, not minutes and a MemoryError), and
    numbers with an exponent (``1e-3``, ``5E2``) are numbers. Duplicate keys are found by
    :func:`parse_settings` on the composed tree."""

    def __init__(self, stream):
        super().__init__(stream)
        self._path: list[str] = []  # the keys from the document's root to the node being composed

    def compose_node(self, parent, index):
        label = (str(index.value) if isinstance(index, yaml.ScalarNode)
                 else f"[{index}]" if isinstance(index, int) and not isinstance(index, bool) else None)
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            where = _dotted(self._path + ([label] if label else []))
            raise _Refused(f"a YAML alias (*{one_line(event.anchor, 40)}) on line {event.start_mark.line + 1}",
                           where, event.start_mark.line + 1,
                           "settings files take no anchors and aliases: write the value itself")
        if label is None:
            return super().compose_node(parent, index)
        self._path.append(label)
        try:
            return super().compose_node(parent, index)
        finally:
            self._path.pop()


SettingsLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


class _PlainDumper(yaml.SafeDumper):
    """Writes a value shared by two settings twice, never as an anchor and alias that :class:`SettingsLoader`
    would refuse on --resume."""

    def ignore_aliases(self, data) -> bool:
        return True


def _dotted(path) -> str:
    """``("ppo", "batch_size")`` -> ``ppo.batch_size``; ``("x", "[2]")`` -> ``x[2]``."""
    return "".join(p if p.startswith("[") or i == 0 else f".{p}" for i, p in enumerate(path))


def _no_duplicate_keys(node, loader: SettingsLoader, path: tuple[str, ...] = ()) -> None:
    """Refuse a key given twice in one mapping, at any depth: YAML keeps the last and drops the first silently."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            label = "?"
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = loader.construct_object(key_node)
                label, line = str(key), key_node.start_mark.line + 1
                if key in seen:
                    raise _Refused(f"duplicate key on line {line} (first on line {seen[key]})", _dotted((*path, label)),
                                   line, "YAML would keep the second and drop the first: write each key once (merge "
                                         "the two blocks into one)")
                seen[key] = line
            _no_duplicate_keys(value_node, loader, (*path, label))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _no_duplicate_keys(item, loader, (*path, f"[{i}]"))


def read_settings(path: Path, field: str) -> Any:
    """:func:`parse_settings` of the file ``path``, whose size is checked before it is read (a UnicodeDecodeError
    is the caller's to word)."""
    size = path.stat().st_size
    if size > MAX_SETTINGS_BYTES:
        raise ConfigError(f"{path} is {size:,} bytes, not a settings file (at most {MAX_SETTINGS_BYTES:,})",
                          field=field, fix="give the YAML file of settings")
    return parse_settings(path.read_text(encoding="utf-8"), str(path), field)


def parse_settings(text: str, source: str, field: str) -> Any:
    """The settings in the YAML ``text`` read from ``source`` (a file name, for messages), strictly: no aliases,
    no duplicate keys, ``1e-3`` a number. Every refusal is a one-line :class:`ConfigError` naming the key (or
    ``field`` when the whole file is at fault) and its line; a message never echoes more than a short excerpt."""
    if len(text) > MAX_SETTINGS_BYTES:
        raise ConfigError(f"{source} is {len(text):,} characters, not a settings file (at most {MAX_SETTINGS_BYTES:,})",
                          field=field, fix="give the YAML file of settings")
    try:  # the reader checks the characters at once: a NUL byte or other control character fails here
        loader = SettingsLoader(text)
    except yaml.YAMLError as e:
        where = str(e).replace('in "<unicode string>", ', "")
        raise ConfigError(f"{source} cannot be read as YAML: {one_line(where, 200)}", field=field,
                          fix="give a text file of YAML settings") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _no_duplicate_keys(node, loader)
        return loader.construct_document(node)
    except _Refused as e:
        raise ConfigError(f"{e.what} in {source}", field=e.key or field, fix=e.fix) from None
    except yaml.YAMLError as e:
        where = str(e).replace('in "<unicode string>", ', "")  # the text was read from source, named already
        raise ConfigError(f"not valid YAML in {source}: {one_line(where, 200)}", field=field) from None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits; nesting thousands deep
        raise ConfigError(f"cannot be read as settings ({type(e).__name__}: {one_line(str(e), 120)}) in {source}",
                          field=field, fix="give the YAML file of settings") from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------------------------
# presets

#: one YAML file per preset (``<name>.yaml``): a new preset is a file, not a code change. A preset names only what
#: it changes from the defaults above; ``base: <preset>`` starts from another preset's settings.
PRESETS_DIR = Path(__file__).with_name("presets")


def _read_preset(name: str, seen: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The settings layers of preset ``name``, its base's first."""
    path = PRESETS_DIR / f"{name}.yaml"
    data = read_settings(path, f"preset {name}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections", field="preset", value=name)
    base = data.pop("base", None)
    if base is None:
        return [data]
    if base in seen or not (PRESETS_DIR / f"{base}.yaml").is_file():
        raise ConfigError(f"{path}: base {brief(base)} is unknown or circular", field="preset", value=name)
    return [*_read_preset(base, (*seen, name)), data]


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


#: every preset's settings layers (read once, at import: four small files)
PRESETS: dict[str, list[dict[str, Any]]] = {name: _read_preset(name) for name in preset_names()}


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


_DROPOUT_REMOVED = ("removed: dropout never acted, because every PPO forward (rollout, scoring, update) runs in "
                    "eval mode; a LoRA has dropout 0 and a loaded adapter's dropout is replaced by identity "
                    "(see docs/ppo.md); delete this key")
_ROLLOUT_RENAMED = ("the section 'generation' is now 'rollout': generation.min_new_tokens -> rollout.length_min, "
                    "generation.max_new_tokens -> rollout.length_max, generation.min_length 5 -> "
                    "rollout.min_new_tokens 4 (T5's min_length counts the decoder start token)")
# keys that older versions had: the unknown-key error says what became of them
REMOVED_KEYS: dict[str, str] = {
    "policy.lora_dropout": _DROPOUT_REMOVED,
    "policy.value_head_dropout": _DROPOUT_REMOVED,
    "data.seed": "removed: the 80/20 split does not shuffle, so no seed acts on it; delete this key",
    "generation": _ROLLOUT_RENAMED,
}


def _unknown(key: str, source: str, known: list[str]) -> ConfigError:
    fix = REMOVED_KEYS.get(key) or REMOVED_KEYS.get(key.split(".")[0]) or _suggest(key, known)
    return ConfigError(f"unknown key in {source}", field=key, fix=fix)


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
        if not isinstance(key, str) or not hasattr(cfg, key):  # a YAML key may be a number, null, ...
            raise _unknown(str(key), source, known)
        target = getattr(cfg, key)
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
                if not isinstance(sub, str) or not hasattr(target, sub):
                    raise _unknown(f"{key}.{sub}", source, known)
                setattr(target, sub, subval)
        else:
            setattr(cfg, key, value)


@functools.cache
def _hints(cls) -> dict[str, Any]:
    """The declared field types of a config dataclass, as types (``int | None``, ``list[str]``, ...)."""
    return typing.get_type_hints(cls)


def _optional(tp: Any) -> tuple[Any, bool]:
    """``T | None`` -> (T, True); any other type -> (it, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Any), True
    return tp, False


def field_type(key: str) -> Any:
    """The declared type of ``section.key`` (or a top-level key); None when there is no such field."""
    parts = key.split(".")
    if parts[0] == "thresholds":
        return float if len(parts) == 2 else None
    cls = HarnessConfig
    for i, part in enumerate(parts):
        tp = _hints(cls).get(part) if is_dataclass(cls) else None
        if tp is None:
            return None
        if i == len(parts) - 1:
            return None if is_dataclass(tp) else tp
        cls = tp
    return None


_NULL = {"null", "none", "~", ""}
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_INT = re.compile(r"[+-]?[0-9]+")


def coerce(key: str, raw: str, tp: Any) -> Any:
    """The text ``raw`` of an override as a value of the field's declared type ``tp``, parsed strictly.

    str keeps the text as given; int, float and bool must parse whole; ``T | None`` also takes
    ``null``/``none``/``~``/empty; ``list[str]`` takes ``a,b,c`` or a YAML list ``[a, b, c]``.
    """
    tp, optional = _optional(tp)
    if optional and raw.strip().lower() in _NULL:
        return None
    or_null = " or null" if optional else ""
    text = raw.strip()
    if tp is str:
        return raw
    if tp is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"got {brief(raw)}, accepted: true or false{or_null}", field=key)
    if tp is int:
        if _INT.fullmatch(text):
            return int(text)
        raise ConfigError(f"got {brief(raw)}, accepted: an integer{or_null}", field=key)
    if tp is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"got {brief(raw)}, accepted: a number{or_null}", field=key) from None
        if not math.isfinite(value):
            raise ConfigError(f"got {brief(raw)}, accepted: a finite number (not inf or nan){or_null}", field=key)
        return value
    if typing.get_origin(tp) is list:
        if text.startswith("["):
            try:
                value = yaml.load(text, Loader=yaml.BaseLoader)  # noqa: S506 - BaseLoader builds only str/list/dict
            except yaml.YAMLError:
                value = None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"got {brief(raw)}, accepted: a list of strings, a,b,c or [a, b, c]", field=key)
            return [v.strip() for v in value if v.strip()]
        return [v.strip() for v in text.split(",") if v.strip()]
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` -> (dotted key, value of the field's declared type).

    The value is parsed by the type of the field it sets (see :func:`coerce`), not guessed from its
    text: ``output.run_id=2026`` is the string ``"2026"``, ``ppo.batch_size=abc`` a :class:`ConfigError`
    naming ``ppo.batch_size``. An unknown key keeps its text; :func:`load_config` then rejects the key.
    """
    if "=" not in text:
        raise ConfigError("an override must look like section.key=value", field="override", value=text,
                          fix="for example ppo.batch_size=32")
    key, raw = text.split("=", 1)
    key = key.strip()
    tp = field_type(key)
    return key, raw if tp is None else coerce(key, raw, tp)


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
    for layer in PRESETS[preset]:
        _apply(cfg, copy.deepcopy(layer), f"preset {preset}")
    if with_thresholds:
        cfg.thresholds.update(load_bounds(preset))
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError("config file not found", field="--config", value=str(path))
        try:
            data = read_settings(path, "--config") or {}
        except UnicodeDecodeError as e:
            raise ConfigError("is not a text (UTF-8) YAML file", field="--config", value=str(path),
                              fix="give the YAML file of settings") from e
        if not isinstance(data, dict):
            raise ConfigError("must hold a mapping of sections", field="--config", value=str(path))
        if "preset" in data and data["preset"] != preset:
            raise ConfigError(f"got {brief(data['preset'])}: the file names another preset than the command line",
                              field="preset", fix=f"pass --preset {brief(data['preset'])} or remove it from the file")
        data.pop("preset", None)
        _apply(cfg, data, str(path))
    return apply_overrides(cfg, overrides or [])


def apply_overrides(cfg: HarnessConfig, overrides: list[str]) -> HarnessConfig:
    """``cfg`` with ``section.key=value`` settings applied (typed by the field, later wins), validated."""
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value), f"override '{text}'")
    validate(cfg)
    return cfg


def flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"ppo": {"steps": 40}}`` -> ``{"ppo.steps": 40}``, in the mapping's own order; an empty mapping
    stays one value. The one flattening of a config (or its saved dict) for comparisons and reports."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_dict(v, key + "."))
        else:
            out[key] = v
    return out


def changed_keys(a: HarnessConfig, b: HarnessConfig) -> list[str]:
    """The dotted keys whose values differ between two configs."""
    fa, fb = flatten_dict(a.to_dict()), flatten_dict(b.to_dict())
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def config_from_dict(data: dict[str, Any]) -> HarnessConfig:
    """Rebuild a config saved with :meth:`HarnessConfig.to_dict` (e.g. from a checkpoint). A setting the saved
    config lacks (one added after it was written, e.g. ``eval.faithfulness_model``) takes its preset's value."""
    data = copy.deepcopy(data)
    cfg = HarnessConfig(preset=data.pop("preset", "tiny"))
    for layer in PRESETS.get(cfg.preset, []):
        _apply(cfg, copy.deepcopy(layer), f"preset {cfg.preset}")
    _apply(cfg, data, "saved config")
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# validation

#: the longest name a file system takes for one directory entry
MAX_NAME_BYTES = 255

# Upper limits of seeds and sizes: a value past them is refused here, before any folder is made, rather than
# overflowing a library (an exit-4 "bug") or asking for terabytes of memory mid-run. README: "Limits".
#: seeds are 32-bit: numpy's seed (which transformers.set_seed, hence sft, uses) takes [0, 2**32 - 1]; torch takes more
SEED_MAX = 2**32 - 1
#: the most tokens a response (eval.max_new_tokens, the rollout's longest draw) or an SFT target may have: four times
#: FLAN-T5's 512-token training length, far past any summary (the reference draws 100-399)
MAX_NEW_TOKENS = 2048
#: the most generations per prompt (expected maximum toxicity uses 25)
MAX_SAMPLES_PER_PROMPT = 1000
#: the most bootstrap resamples (the default 9999 gives stable 2.5% tails)
MAX_BOOTSTRAP_RESAMPLES = 1_000_000
#: the largest LoRA rank: past the widest FLAN-T5's model dimension (4096, xxl) a rank adds nothing
MAX_LORA_R = 4096
#: the most prompt or classifier input tokens one may ask for (the models read at most 512)
MAX_INPUT_TOKENS = 8192


def _in_range(value, low: int, high: int, field_name: str, what: str = "an integer") -> None:
    _check(low <= value <= high, field_name, value, f"{what} in [{low}, {high}]")


def name_problem(name: str) -> str | None:
    """What keeps ``name`` from being one plain directory entry (a run id, a file name), or None: a name with a
    path separator, ``.`` or ``..``, or a control character would put files outside the directory meant for them
    (``output.run_id=.`` writes the run into ``reports/`` itself, over its history page)."""
    if not name.strip():
        return "is empty"
    if name in (".", ".."):
        return "names a directory itself, not an entry in it"
    if "/" in name or "\\" in name:
        return "holds a path separator (/ or \\)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def check_name(name: str, field_name: str, fix: str) -> None:
    """A :class:`ConfigError` naming ``field_name`` when ``name`` is not one plain directory entry."""
    problem = name_problem(name)
    if problem:
        raise ConfigError(f"got {brief(name)}, which {problem}", field=field_name, fix=fix)


def _check(cond: bool, field_name: str, value, accepted: str) -> None:
    if not cond:
        raise ConfigError(f"got {brief(value)}, accepted: {accepted}", field=field_name)


def _typed(cfg_section, section: str) -> None:
    """Coerce ints given for float fields and reject values of the wrong type (e.g. from a YAML file)."""
    hints = _hints(type(cfg_section))
    for f in fields(cfg_section):
        value = getattr(cfg_section, f.name)
        name = f"{section}.{f.name}"
        base, optional = _optional(hints[f.name])
        if value is None:
            _check(optional, name, value, f"a value of type {getattr(base, '__name__', base)}")
            continue
        if base is float:
            _check(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "a number")
            _check(math.isfinite(value), name, value, "a finite number (not inf or nan)")
            setattr(cfg_section, f.name, float(value))
        elif base is int:
            _check(isinstance(value, int) and not isinstance(value, bool), name, value, "an integer")
        elif base is bool:
            _check(isinstance(value, bool), name, value, "true or false")
        elif base is str:
            _check(isinstance(value, str), name, value, "a string (in YAML, quote a value that reads as a number "
                                                        "or boolean: '2026')")
        elif typing.get_origin(base) is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
                setattr(cfg_section, f.name, value)
            _check(isinstance(value, list) and all(isinstance(v, str) for v in value) and value, name, value,
                   "a non-empty list of strings")


def validate_sampling(s: SamplingConfig, section: str, longest: int, longest_name: str) -> None:
    """The checks of the :class:`SamplingConfig` fields, for ``rollout`` and ``eval`` alike.

    ``longest`` is the most new tokens a response may get (``longest_name`` says where it comes from):
    ``min_new_tokens`` may not pass it.
    """
    _check(0 <= s.min_new_tokens <= longest, f"{section}.min_new_tokens", s.min_new_tokens,
           f"an integer in [0, {longest_name} = {longest}]")
    _check(s.top_k >= 0, f"{section}.top_k", s.top_k, "an integer >= 0 (0 = off)")
    _check(0.0 < s.top_p <= 1.0, f"{section}.top_p", s.top_p, "a number in (0, 1]")
    # one distribution: PPO's log-probs and the KL are those of what was sampled. Temperature and the EOS
    # ban are applied to both models' logits; a top-k / top-p filter cannot be (the reference's own filter
    # gives a sampled token outside it probability 0, so the KL is infinite): refuse it.
    _check(s.top_k == 0, f"{section}.top_k", s.top_k,
           "0: top-k filtering would sample from another distribution than the one PPO's log-probs and the KL "
           "to the reference are computed on (a token outside the reference's top-k has infinite KL); use "
           "temperature to sharpen sampling")
    _check(s.top_p == 1.0, f"{section}.top_p", s.top_p,
           "1.0: nucleus filtering would sample from another distribution than the one PPO's log-probs and the "
           "KL to the reference are computed on; use temperature to sharpen sampling")
    _check(s.temperature > 0, f"{section}.temperature", s.temperature, "a number > 0")


SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")


def validate_sft(s: SFTConfig) -> None:
    for name in ("steps", "batch_size"):
        _check(getattr(s, name) > 0, f"sft.{name}", getattr(s, name), "an integer > 0")
    for name in ("max_target_tokens", "generation_max_new_tokens"):
        _in_range(getattr(s, name), 1, MAX_NEW_TOKENS, f"sft.{name}")
    _check(s.learning_rate > 0, "sft.learning_rate", s.learning_rate, "a number > 0")
    _check(s.lr_scheduler in SCHEDULERS, "sft.lr_scheduler", s.lr_scheduler, ", ".join(SCHEDULERS))
    _check(s.warmup >= 0 and (s.warmup < 1 or float(s.warmup).is_integer()), "sft.warmup", s.warmup,
           "a ratio in [0, 1) or a whole number of steps")
    _check(s.weight_decay >= 0, "sft.weight_decay", s.weight_decay, "a number >= 0")
    _check(s.max_grad_norm > 0, "sft.max_grad_norm", s.max_grad_norm, "a number > 0")
    _check(s.validation_rows is None or s.validation_rows > 0, "sft.validation_rows", s.validation_rows,
           "an integer > 0, or null for the whole split")
    for name in ("eval_every", "checkpoint_every"):
        _check(getattr(s, name) >= 0, f"sft.{name}", getattr(s, name), "an integer >= 0 (0 = at the end)")


def validate(cfg: HarnessConfig) -> HarnessConfig:
    for section in ("data", "policy", "reward", "rollout", "ppo", "eval", "sft", "output"):
        _typed(getattr(cfg, section), section)
    _check(isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool) and 0 <= cfg.seed <= SEED_MAX, "seed",
           cfg.seed, f"an integer in [0, {SEED_MAX}] (2**32 - 1: what numpy's and torch's seeding both take)")
    _check(cfg.device == "auto" or cfg.device == "cpu" or str(cfg.device).startswith("cuda"), "device",
           cfg.device, "auto, cpu, cuda or cuda:N")
    d = cfg.data
    _check(d.min_chars >= 0, "data.min_chars", d.min_chars, "an integer >= 0")
    _check(d.max_chars > d.min_chars + 1, "data.max_chars", d.max_chars,
           f"an integer > data.min_chars + 1 = {d.min_chars + 1} (bounds are exclusive)")
    _check("{dialogue}" in d.prompt_template, "data.prompt_template", d.prompt_template,
           "a template containing {dialogue}")
    _check(0.0 < d.test_fraction < 1.0, "data.test_fraction", d.test_fraction, "a number in (0, 1)")
    _check(d.max_prompt_tokens is None or 0 < d.max_prompt_tokens <= MAX_INPUT_TOKENS, "data.max_prompt_tokens",
           d.max_prompt_tokens, f"an integer in [1, {MAX_INPUT_TOKENS}], or null for the tokenizer's limit")
    _check(d.max_rows is None or d.max_rows > 0, "data.max_rows", d.max_rows, "a positive integer or null")
    p = cfg.policy
    _check(p.dtype in ("auto", "float32", "bfloat16", "float16"), "policy.dtype", p.dtype,
           "auto, float32, bfloat16 or float16")
    _in_range(p.lora_r, 1, MAX_LORA_R, "policy.lora_r")
    _check(p.lora_alpha > 0, "policy.lora_alpha", p.lora_alpha, "an integer > 0")
    _check(p.use_lora or p.adapter is None, "policy.adapter", p.adapter, "null when policy.use_lora is false")
    _check(p.reference in ("start", "base"), "policy.reference", p.reference,
           "start (the starting adapter, frozen) or base (the base model with every adapter off)")
    r = cfg.reward
    _check(r.input in ("query+response", "response"), "reward.input", r.input, "query+response or response")
    _check(r.transform in ("logit", "prob", "logprob"), "reward.transform", r.transform, "logit, prob or logprob")
    _check(r.batch_size > 0, "reward.batch_size", r.batch_size, "an integer > 0")
    _check(r.max_length is None or 0 < r.max_length <= MAX_INPUT_TOKENS, "reward.max_length", r.max_length,
           f"an integer in [1, {MAX_INPUT_TOKENS}], or null for the classifier's limit")
    _check(not r.score_norm or r.score_scaling, "reward.score_norm", r.score_norm,
           "false unless reward.score_scaling is true")
    _check(r.score_clip is None or r.score_clip > 0, "reward.score_clip", r.score_clip, "a number > 0 or null")
    _check(bool(r.label), "reward.label", r.label, "a label name of the classifier, e.g. nothate")
    g = cfg.rollout
    _check(g.length_min > 0, "rollout.length_min", g.length_min, "an integer > 0")
    _check(g.length_max > g.length_min, "rollout.length_max", g.length_max,
           f"an integer > rollout.length_min = {g.length_min} (the length sampler draws max_new_tokens from "
           "[length_min, length_max))")
    _check(g.length_max <= MAX_NEW_TOKENS + 1, "rollout.length_max", g.length_max,
           f"an integer in (rollout.length_min, {MAX_NEW_TOKENS + 1}]: the longest draw, length_max - 1, is at most "
           f"{MAX_NEW_TOKENS} new tokens")
    validate_sampling(g, "rollout", g.length_max - 1, "the longest draw, rollout.length_max - 1")
    o = cfg.ppo
    _check(o.steps > 0, "ppo.steps", o.steps, "an integer > 0")
    _check(o.learning_rate > 0, "ppo.learning_rate", o.learning_rate, "a number > 0")
    for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
        _check(getattr(o, name) > 0, f"ppo.{name}", getattr(o, name), "an integer > 0")
    if o.batch_size % (o.mini_batch_size * o.gradient_accumulation_steps) != 0:
        raise ConfigError(
            f"got {brief(o.batch_size)}, accepted: a multiple of ppo.mini_batch_size x ppo.gradient_accumulation_steps "
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
    _check(e.num_samples is None or e.num_samples > 0, "eval.num_samples", e.num_samples,
           "an integer > 0, or null for the whole test split")
    for name in ("batch_size", "min_words"):
        _check(getattr(e, name) > 0, f"eval.{name}", getattr(e, name), "an integer > 0")
    _in_range(e.samples_per_prompt, 1, MAX_SAMPLES_PER_PROMPT, "eval.samples_per_prompt")
    _in_range(e.max_new_tokens, 1, MAX_NEW_TOKENS, "eval.max_new_tokens")
    _in_range(e.bootstrap_resamples, 1, MAX_BOOTSTRAP_RESAMPLES, "eval.bootstrap_resamples")
    _in_range(e.seed, 0, SEED_MAX, "eval.seed")
    _check(0.0 < e.copy_threshold <= 1.0, "eval.copy_threshold", e.copy_threshold, "a number in (0, 1]")
    validate_sampling(e, "eval", e.max_new_tokens, "eval.max_new_tokens")
    validate_sft(cfg.sft)
    _check(0.0 < e.confidence < 1.0, "eval.confidence", e.confidence, "a number in (0, 1)")
    _check(0.0 < e.toxic_threshold < 1.0, "eval.toxic_threshold", e.toxic_threshold, "a number in (0, 1)")
    _check(e.qualitative_rows >= 0, "eval.qualitative_rows", e.qualitative_rows, "an integer >= 0")
    _check(e.faithfulness_model is None or bool(e.faithfulness_model.strip()), "eval.faithfulness_model",
           e.faithfulness_model, "a hub id or directory of an NLI cross-encoder (e.g. FacebookAI/roberta-large-mnli), "
                                 "or null for no faithfulness judge")
    _check(0.0 < e.faithful_threshold < 1.0, "eval.faithful_threshold", e.faithful_threshold, "a number in (0, 1)")
    _check(e.faithfulness_batch_size > 0, "eval.faithfulness_batch_size", e.faithfulness_batch_size, "an integer > 0")
    _check(e.curve_every >= 0, "eval.curve_every", e.curve_every,
           "an integer >= 0 (a curve point every N PPO steps; 0 = no curve)")
    _check(e.curve_prompts > 0, "eval.curve_prompts", e.curve_prompts,
           "an integer > 0 (the first N test prompts the curve evaluates)")
    if cfg.output.run_id is not None:  # the run's directory is <output.dir>/<run_id>: one entry, never a path
        check_name(cfg.output.run_id, "output.run_id",
                   "give one plain name such as my-run (no / or \\, no control characters, not . or ..; output.dir "
                   "says where runs go), or omit it for <time>-<preset>-s<seed>")
    trackers = cfg.output.report_to or []
    _check(all(t in TRACKERS for t in trackers) and len(set(trackers)) == len(trackers), "output.report_to",
           cfg.output.report_to, f"a list of distinct trackers among {', '.join(TRACKERS)}, e.g. "
                                  "[tensorboard, mlflow] (or null for none)")
    validate_bounds(cfg.thresholds)
    return cfg
