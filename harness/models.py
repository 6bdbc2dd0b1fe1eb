"""Loading the policy (seq2seq base + LoRA adapter + value head), its reference, and classifiers.

Every location is a Hugging Face Hub id or a local directory (the plan turns a ``tiny://...`` id of the tiny
world into its directory first); all of them go through the same ``from_pretrained`` calls, so the tests on tiny
models saved to disk exercise the code that loads the real ones.

The reference model is the starting policy, frozen, without a second copy of the base weights: with a fresh
LoRA it is the base with the adapter disabled (``disable_adapter()``); with a starting adapter
(``policy.adapter``, e.g. the SFT warm start) it is that adapter loaded a second time through peft's
multi-adapter API under the name :data:`REFERENCE_ADAPTER`, never trained, and switched on for the
reference's forward passes (``policy.reference=base`` keeps TRL's way instead: every adapter disabled). A
frozen copy is made only when there is no adapter (full fine-tuning).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import PolicyConfig
from .errors import ModelLoadError, first_line

if TYPE_CHECKING:
    from transformers.modeling_outputs import BaseModelOutput

VALUE_HEAD_FILE = "value_head.safetensors"
TRAINED_ADAPTER = "default"  # peft's name of the adapter PPO trains
REFERENCE_ADAPTER = "reference"  # the starting adapter's frozen second copy (only with policy.adapter)
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ locations

def resolve_location(location: str, field: str = "model") -> str:
    """A model location as the loaders read it: a hub id, or a local directory (``~`` expanded). A ``tiny://`` id
    is the plan's to replace by its directory (:func:`harness.plan.concrete`); here it is refused."""
    if location is None:
        raise ModelLoadError("no model location given", field=field, fix="set it to a hub id or a local directory")
    location = str(location)
    if location.startswith("tiny://"):
        raise ModelLoadError("a tiny:// id reached the model loader unresolved", field=field, value=location,
                             fix="load through a plan (harness.plan.concrete(cfg) gives the directories)")
    return os.path.expanduser(location)


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as the environment says *now*."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "0"
    return value.strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def hub_offline():
    """Within this block the Hub libraries honour ``HF_HUB_OFFLINE`` even when it was set after they were
    imported (they read it once, at import): a load then finds its files locally or fails at once,
    instead of retrying the network for minutes."""
    if not offline():
        yield
        return
    patched = []
    for module_name in ("huggingface_hub.constants", "datasets.config", "transformers.utils.hub"):
        import sys

        module = sys.modules.get(module_name)
        if module is not None and getattr(module, "HF_HUB_OFFLINE", True) is False:
            patched.append(module)
            module.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for module in patched:
            module.HF_HUB_OFFLINE = False


@contextlib.contextmanager
def quiet_libraries():
    """Within this block transformers and huggingface_hub print errors only: no per-retry network warnings
    (an offline machine prints twenty before the harness's own one-line error), no "sequence longer than the
    model's maximum" notice for rows the harness truncates itself, no MISSING-weights table (the harness
    checks and reports that itself). ``detox-harness -v`` keeps them."""
    from transformers.utils import logging as hf_logging

    if logging.getLogger("harness").isEnabledFor(logging.INFO):  # --verbose
        yield
        return
    verbosity = hf_logging.get_verbosity()
    hub = logging.getLogger("huggingface_hub")
    hub_level = hub.level
    hf_logging.set_verbosity_error()
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hub.setLevel(hub_level)


def _looks_local(location: str) -> bool:
    return location.startswith((".", "/", "~")) or os.path.exists(location)


def _offline_hint(location: str, field: str) -> str:
    why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline() else \
        "the machine may be offline or the id wrong"
    return (f"{why}: download it on a connected machine (huggingface-cli download {location} --local-dir DIR) "
            f"and give the local path, {field}=DIR")


def load_pretrained(cls, location: str, *, field: str, what: str, **kwargs):
    """``cls.from_pretrained(location)`` with a clear error naming the config field and the fix.

    With ``HF_HUB_OFFLINE=1`` nothing is fetched: a hub id is looked up in the local cache only
    (``local_files_only``), so a missing model fails at once with a message saying how to give a path.
    """
    resolved = resolve_location(location, field)
    if _looks_local(resolved) and not os.path.exists(resolved):
        raise ModelLoadError(f"{what} directory does not exist", field=field, value=resolved,
                             fix="give an existing directory written by save_pretrained, or a hub id")
    if offline() and not os.path.exists(resolved):
        kwargs.setdefault("local_files_only", True)
    try:
        with hub_offline(), quiet_libraries():
            loaded = cls.from_pretrained(resolved, **kwargs)
    except Exception as e:  # transformers, huggingface_hub and safetensors raise many types here
        detail = first_line(e)
        if os.path.isdir(resolved):
            hint = f"the directory is not a complete {what} (config and weights written by save_pretrained)"
            if type(e).__name__ == "SafetensorError" or "safetensors" in detail.lower():
                detail = f"a weights file is corrupt or truncated ({detail})"
                hint = f"re-save the {what} with save_pretrained, or download it again"
        elif isinstance(e, (OSError, ValueError)) or "connect" in detail.lower() or "offline" in detail.lower():
            hint = _offline_hint(resolved, field)
        else:
            hint = f"check that {field} names a {what}"
        raise ModelLoadError(f"cannot load {what}: {detail}", field=field, value=resolved, fix=hint) from e
    if os.path.isdir(resolved):
        _require_vocabulary(loaded, Path(resolved), field, what)
    return loaded


def _require_vocabulary(tokenizer, directory: Path, field: str, what: str) -> None:
    """A tokenizer read from a directory that holds none of its vocabulary files (only a config, say) is refused:
    transformers then builds one with an empty vocabulary, whose every word is the unknown token, and a run would
    train and judge on nothing but unknown tokens."""
    names = getattr(tokenizer, "vocab_files_names", None)
    if not names:  # not a tokenizer (a model, a config)
        return
    wanted = sorted(set(names.values()))
    if not any((directory / name).is_file() for name in wanted):
        raise ModelLoadError(f"the directory holds no {what} vocabulary (none of {', '.join(wanted)})", field=field,
                             value=str(directory),
                             fix="save the tokenizer the model was trained with into it (tokenizer.save_pretrained"
                                 "(DIR)), or download the whole model again")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("CUDA was asked for but no CUDA device is available", field="device", value=name,
                             fix="use device=cpu or run on a GPU machine")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ------------------------------------------------------------------------------------ value head

class ValueHead(nn.Module):
    """One linear layer on the decoder's last hidden state: hidden -> 1 (768 -> 1 for flan-t5-base).

    No dropout: every forward of a run is in eval mode, where dropout is the identity anyway.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


# ------------------------------------------------------------------------------------ policy

def encode(model, enc_ids: torch.Tensor, enc_mask: torch.Tensor, chunk: int | None = None) -> BaseModelOutput:
    """The encoder's output for right-padded prompts, computed in chunks of rows of similar length.

    Rows are sorted by length and each chunk of ``chunk`` rows is cut to its own longest prompt, so the
    encoder does not run over the batch's padding (prompts of 150-250 tokens padded to 250 waste a fifth of
    it); the outputs are put back in place (past each prompt: masked, never read). ``chunk`` None: 4 rows
    on the CPU, the whole batch elsewhere (a GPU gains little from the trimmed padding). Both decoding paths
    use this, so they see the same encoder output; a training forward passes ``chunk`` 1 (each prompt at its
    own length). Differentiable: the chunks' outputs are written into a zero tensor.
    """
    from transformers.modeling_outputs import BaseModelOutput

    encoder = model.get_encoder()
    batch = enc_ids.shape[0]
    chunk = chunk or (4 if enc_ids.device.type == "cpu" else batch)
    lengths = enc_mask.sum(-1)
    if chunk >= batch and int(lengths.max()) == enc_ids.shape[1]:  # one chunk, no column of padding only
        return encoder(input_ids=enc_ids, attention_mask=enc_mask)
    order = torch.argsort(lengths, stable=True)
    hidden = None
    for rows in order.split(chunk):
        width = int(lengths[rows].max())
        out = encoder(input_ids=enc_ids[rows, :width], attention_mask=enc_mask[rows, :width]).last_hidden_state
        if hidden is None:
            hidden = out.new_zeros((batch, enc_ids.shape[1], out.shape[-1]))
        hidden[rows, :width] = out
    return BaseModelOutput(last_hidden_state=hidden)


class PolicyWithValueHead(nn.Module):
    """A seq2seq LM (usually a peft LoRA model) with a value head, and its reference model.

    ``forward`` returns float32 ``(logits, values)`` for the decoder positions; ``reference_logits``
    runs the same inputs through the reference (adapter disabled, or the frozen copy).
    """

    def __init__(self, model: nn.Module, value_head: ValueHead, ref_model: nn.Module | None = None,
                 tokenizer=None):
        super().__init__()
        self.model = model
        self.value_head = value_head
        self.ref_model = ref_model
        self.tokenizer = tokenizer
        self.is_peft = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        self.reference_adapter = REFERENCE_ADAPTER if self.is_peft and REFERENCE_ADAPTER in model.peft_config else None

    @property
    def config(self):
        return self.base_model.config

    @property
    def base_model(self) -> nn.Module:
        return self.model.get_base_model() if self.is_peft else self.model

    @property
    def device(self) -> torch.device:
        return next(self.value_head.parameters()).device

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                encoder_chunk: int | None = None):
        """``encoder_chunk``: encode the prompts in chunks of that many rows of similar length, each cut to its
        own longest prompt (:func:`encode`), rather than the whole batch at its longest."""
        encoded = {} if encoder_chunk is None else {
            "encoder_outputs": encode(self.model, input_ids, attention_mask, chunk=encoder_chunk)}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                         decoder_attention_mask=decoder_attention_mask, output_hidden_states=True, return_dict=True,
                         **encoded)
        values = self.value_head(out.decoder_hidden_states[-1]).float()
        return out.logits.float(), values

    @contextlib.contextmanager
    def reference(self):
        """Within this context ``self.model`` (or the frozen copy) is the reference: the starting policy.

        With a starting adapter the frozen :data:`REFERENCE_ADAPTER` is the active one (peft's
        ``set_adapter`` in inference mode; the trained adapter is made trainable again on the way out),
        with a fresh LoRA every adapter is disabled.
        """
        if self.reference_adapter:
            self.model.set_adapter(self.reference_adapter, inference_mode=True)
            try:
                yield self.model
            finally:
                self.model.set_adapter(TRAINED_ADAPTER)
        else:
            with self.base() as base:
                yield base

    @contextlib.contextmanager
    def base(self):
        """Within this context ``self.model`` is the bare base model, every adapter disabled (or the frozen
        copy when training in full): the reference without a starting adapter, and "base" in a report that
        also shows the starting adapter."""
        if self.is_peft:
            with self.model.disable_adapter():
                yield self.model
        else:
            if self.ref_model is None:
                raise ModelLoadError("a policy without an adapter needs a frozen reference copy",
                                     field="policy.use_lora")
            yield self.ref_model

    @torch.no_grad()
    def reference_logits(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
        with self.reference() as ref:
            out = ref(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                      decoder_attention_mask=decoder_attention_mask, return_dict=True)
        return out.logits.float()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save_pretrained(self, directory: str | Path) -> None:
        """Adapter (or full model) with ``save_pretrained`` in safetensors, value head, tokenizer."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.is_peft:  # the trained adapter only, not the frozen reference copy
            self.model.save_pretrained(directory, safe_serialization=True, selected_adapters=[TRAINED_ADAPTER])
        else:
            self.model.save_pretrained(directory, safe_serialization=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.value_head.state_dict().items()},
                  str(directory / VALUE_HEAD_FILE))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)

    def load_value_head(self, directory: str | Path, field: str = "policy.adapter") -> None:
        from safetensors.torch import load_file

        path = Path(directory) / VALUE_HEAD_FILE
        if not path.is_file():
            raise ModelLoadError("value head weights are missing", field=field, value=str(path),
                                 fix=f"the directory must hold {VALUE_HEAD_FILE} written by the harness")
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError for a corrupt file
            raise ModelLoadError(f"value head weights are corrupt or truncated ({first_line(e)})", field=field,
                                 value=str(path), fix="re-save the adapter with the harness") from e
        try:
            self.value_head.load_state_dict(state)
        except RuntimeError as e:
            raise ModelLoadError(f"value head does not fit the model: {first_line(e)}",
                                 field=field, value=str(path),
                                 fix="use the base model the adapter was trained on") from e


def load_tokenizer(location: str, *, field: str = "policy.model", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer, location, field=field, what="tokenizer",
                           trust_remote_code=trust_remote_code)


def _check_safetensors(path: Path, field: str, what: str) -> None:
    """Open a safetensors file's header: a truncated or foreign file fails here, with a clear message."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if keys:
                f.get_slice(keys[-1])  # the last tensor's offsets must lie inside the file
    except Exception as e:
        raise ModelLoadError(f"{what} {path.name} is corrupt or truncated ({first_line(e)})", field=field,
                             value=str(path.parent), fix="re-save it with save_pretrained, or copy it again") from e


def _check_adapter_dir(adapter: str) -> str:
    path = resolve_location(adapter, "policy.adapter")
    if not os.path.isdir(path):
        raise ModelLoadError("adapter directory does not exist", field="policy.adapter", value=path,
                             fix="give a directory written by peft's save_pretrained (adapter_config.json + weights)")
    cfg_file = Path(path) / "adapter_config.json"
    if not cfg_file.is_file():
        raise ModelLoadError("not an adapter directory: adapter_config.json is missing", field="policy.adapter",
                             value=path, fix="give a directory written by peft's save_pretrained")
    try:
        adapter_cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise ModelLoadError(f"adapter_config.json is corrupt ({msg})", field="policy.adapter", value=path,
                             fix="re-save the adapter with save_pretrained") from e
    if not isinstance(adapter_cfg, dict) or "peft_type" not in adapter_cfg:
        raise ModelLoadError("adapter_config.json is not a peft adapter config (no peft_type)",
                             field="policy.adapter", value=path, fix="re-save the adapter with save_pretrained")
    if adapter_cfg.get("peft_type") != "LORA":
        raise ModelLoadError(f"the adapter is a {adapter_cfg.get('peft_type')} adapter, not LoRA",
                             field="policy.adapter", value=path, fix="give a LoRA adapter directory")
    weights = [Path(path) / f for f in ADAPTER_WEIGHTS if (Path(path) / f).is_file()]
    if not weights:
        raise ModelLoadError("adapter weights are missing (adapter_model.safetensors)", field="policy.adapter",
                             value=path, fix="re-save the adapter with save_pretrained")
    if weights[0].suffix == ".safetensors":
        _check_safetensors(weights[0], "policy.adapter", "adapter weights")
    return path


def _adapter_base(path: str) -> str | None:
    try:
        return json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


def _mismatch_detail(e: BaseException) -> str:
    """The informative line of a state-dict error (``size mismatch for ...``), else its first line."""
    for line in str(e).splitlines():
        line = line.strip()
        if line.startswith(("size mismatch", "Missing key", "Unexpected key")) or "not found in the base model" in line:
            return line[:300]
    return first_line(e)


def load_policy(cfg: PolicyConfig, device: str | torch.device = "cpu", tokenizer=None) -> PolicyWithValueHead:
    """Base model + LoRA (loaded trainable from ``cfg.adapter`` or freshly created) + value head.

    The LoRA has no dropout: a new one is created with dropout 0, and a loaded adapter's dropout modules
    (e.g. the reference's 0.05) are replaced by the identity: every forward of a run is in eval mode, where
    dropout does nothing, so a dropout setting would only pretend to act.
    """
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    device = resolve_device(device) if isinstance(device, str) else device
    dtype = resolve_dtype(cfg.dtype, device)
    base, info = load_pretrained(AutoModelForSeq2SeqLM, cfg.model, field="policy.model", what="seq2seq model",
                                 dtype=dtype, trust_remote_code=cfg.trust_remote_code, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers' own table is kept off the terminal (quiet_libraries): say it in one line
        log.warning(
            "policy.model: %d weights were not in the checkpoint and start from random values (e.g. %s): a "
            "partial checkpoint summarizes badly", len(missing), missing[0])
    if not base.config.is_encoder_decoder:
        raise ModelLoadError("the policy must be an encoder-decoder model (T5, FLAN-T5, BART)",
                             field="policy.model", value=cfg.model)
    fuse_activations(base)
    from .attention import use_shared_bias_attention  # loads transformers: not at import time

    use_shared_bias_attention(base)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    ref_model = None
    if cfg.use_lora:
        if cfg.adapter:
            path = _check_adapter_dir(cfg.adapter)
            trained_on = _adapter_base(path)
            try:
                model = PeftModel.from_pretrained(base, path, is_trainable=True)
            except Exception as e:  # peft/torch raise RuntimeError, ValueError, KeyError, ... on a mismatch
                on = f"it was trained on {trained_on!r}, " if trained_on else ""
                raise ModelLoadError(f"adapter does not fit the base model: {_mismatch_detail(e)}",
                                     field="policy.adapter", value=path,
                                     fix=f"{on}policy.model is {cfg.model!r}: set policy.model to the base model "
                                         "the adapter was trained on (base_model_name_or_path in "
                                         "adapter_config.json)") from e
            if cfg.reference == "start":  # the starting adapter a second time, frozen: the reference
                model.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
                model.set_adapter(TRAINED_ADAPTER)
            if trained_on and not _same_model(trained_on, cfg.model):
                log.warning("policy.adapter %s was trained on %r but policy.model is %r; the shapes fit, so it "
                            "is loaded anyway", path, trained_on, cfg.model)
            _lora_dropout_to_identity(model)
        else:
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_target_modules),
                              lora_dropout=0.0, bias="none", task_type=TaskType.SEQ_2_SEQ_LM)
            try:
                model = get_peft_model(base, lora)
            except ValueError as e:
                raise ModelLoadError(f"cannot attach LoRA: {str(e).splitlines()[0]}",
                                     field="policy.lora_target_modules", value=cfg.lora_target_modules,
                                     fix="name modules the model has (T5: q, k, v, o, wi, wo)") from e
    else:
        model = base
        ref_model = copy.deepcopy(base).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    hidden = getattr(base.config, "d_model", None) or base.config.hidden_size
    value_head = ValueHead(hidden)
    policy = PolicyWithValueHead(model, value_head, ref_model=ref_model, tokenizer=tokenizer).to(device)
    value_head.to(torch.float32)
    if cfg.adapter and (Path(resolve_location(cfg.adapter)) / VALUE_HEAD_FILE).is_file():
        policy.load_value_head(resolve_location(cfg.adapter))
    policy.eval()
    return policy


def fuse_activations(model: nn.Module) -> int:
    """Replace each ``NewGELUActivation`` (FLAN-T5's ``gelu_new``, written as a chain of elementwise ops) by
    transformers' ``GELUTanh``, the same tanh formula as one fused kernel (``F.gelu(approximate="tanh")``):
    equal to float rounding (a few 1e-7), and on a CPU 4-6x faster forward and backward over a feed-forward
    layer's (B, L, d_ff) activations. Returns how many modules were replaced."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swaps = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is NewGELUActivation]
    for parent, name in swaps:
        setattr(parent, name, GELUTanh())
    return len(swaps)


def _same_model(a: str, b: str) -> bool:
    """Loosely the same model: equal ids or paths, or the same last path component (local copies of a hub id)."""
    if str(a) == str(b):
        return True
    try:
        ra, rb = resolve_location(a), resolve_location(b)
    except Exception:
        return False
    name = lambda x: Path(str(x).rstrip("/")).name  # noqa: E731
    return ra == rb or name(ra) == name(rb) or name(a) == name(b)


def _lora_dropout_to_identity(model) -> None:
    """Replace every LoRA dropout module (peft keeps one per adapter in ``lora_dropout``) by the identity."""
    for module in model.modules():
        drop = getattr(module, "lora_dropout", None)
        if isinstance(drop, nn.ModuleDict):
            for key in list(drop.keys()):
                drop[key] = nn.Identity()


def count_parameters(policy: PolicyWithValueHead) -> dict[str, float]:
    """Trainable and total parameters the way REFERENCE.md (peft) reports them, value head apart."""
    model_params = list(policy.model.parameters())
    trainable = sum(p.numel() for p in model_params if p.requires_grad)
    total = sum(p.numel() for p in model_params)
    head = sum(p.numel() for p in policy.value_head.parameters())
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total, "value_head": head}


def format_parameter_count(counts: dict[str, float]) -> str:
    return (f"trainable model parameters: {counts['trainable']:,} of {counts['total']:,} "
            f"({counts['percent']:.2f}%); value head: {counts['value_head']:,}")
