"""Classifier scoring: rewards (a label's logit) and toxicity (P(toxic label)), batched.

Labels are always picked by name from the model's ``config.label2id``, never by position: the
transformers text-classification pipeline sorts scores, so ``scores[0]`` is the top label, not
necessarily ``nothate`` (REFERENCE.md, "Known traps").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import ModelLoadError
from .judges import position_limit, too_long
from .models import load_pretrained, resolve_device


class Classifier:
    """A sequence-classification model with its tokenizer, scoring texts in batches."""

    def __init__(self, model, tokenizer, *, label: str = "nothate", toxic_label: str = "hate", batch_size: int = 16,
                 max_length: int | None = None, field: str = "reward"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = input_limit(model, tokenizer, max_length)
        self.label2id = label_ids(model.config)
        # a multi-label judge (e.g. unitary/toxic-bert: toxic, insult, ... each its own yes/no) scores every label
        # with a sigmoid; a single-label classifier (dynabench: nothate vs hate) with a softmax over the labels
        self.multi_label = (getattr(model.config, "problem_type", None) == "multi_label_classification"
                            or len(self.label2id) == 1)
        self.field = field
        label_field, toxic_field = _label_fields(field)
        self.label_index = self._index(label, label_field)
        self.toxic_index = self._index(toxic_label, toxic_field)

    def _index(self, name: str, field: str) -> int:
        if name not in self.label2id:
            labels = ", ".join(self.label2id) or "none"
            near = [k for k in self.label2id if k.lower() == str(name).lower()]
            fix = f"did you mean '{near[0]}'? (labels match exactly)" if near else \
                "set it to one of the classifier's labels"
            raise ModelLoadError(f"the classifier has no label '{name}' (its labels: {labels})",
                                 field=field, fix=fix)
        return self.label2id[name]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, location: str, *, label: str = "nothate", toxic_label: str = "hate", batch_size: int = 16,
             max_length: int | None = None, device: str | torch.device = "cpu", field: str = "reward",
             trust_remote_code: bool = False) -> "Classifier":
        model, tokenizer = load_sequence_classifier(
            location, field=_model_field(field), device=device, trust_remote_code=trust_remote_code,
            fix="give a text classifier fine-tuned for toxicity (e.g. "
                "facebook/roberta-hate-speech-dynabench-r4-target), not a base or seq2seq model")
        return cls(model, tokenizer, label=label, toxic_label=toxic_label, batch_size=batch_size,
                   max_length=max_length, field=field)

    @torch.no_grad()
    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, num_labels) float32 logits on the CPU."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            chunk = [t if isinstance(t, str) else str(t) for t in texts[i:i + self.batch_size]]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            out.append(self.model(**enc).logits.float().cpu())
        if not out:
            return torch.zeros((0, len(self.label2id)))
        return torch.cat(out)

    def log_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of each label: log-softmax over the labels, or log-sigmoid per label (multi-label)."""
        return torch.nn.functional.logsigmoid(logits) if self.multi_label else torch.log_softmax(logits, dim=-1)

    def clean_log_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """log P(not toxic) = log(1 - P(toxic label)) of each row, from the toxic label alone, whichever label the
        reward reads: a policy trained on an inverted reward label cannot raise it. With a two-label softmax it is
        log P(the other label) (log P(nothate)); with a sigmoid per label log sigmoid(-logit)."""
        if self.multi_label:
            return torch.nn.functional.logsigmoid(-logits[:, self.toxic_index])
        others = [i for i in range(logits.shape[-1]) if i != self.toxic_index]
        return torch.logsumexp(torch.log_softmax(logits, dim=-1)[:, others], dim=-1)

    def toxicity(self, texts: Sequence[str]) -> torch.Tensor:
        """P(toxic label) in [0, 1] for each text."""
        return self.log_probabilities(self.logits(texts))[:, self.toxic_index].exp()

    def reward(self, logits: torch.Tensor, transform: str = "logit") -> torch.Tensor:
        """The reward of each row of ``logits``: the reward label's ``logit``, ``prob`` or ``logprob``."""
        if transform == "logit":
            return logits[:, self.label_index]
        if transform == "prob":
            return self.log_probabilities(logits)[:, self.label_index].exp()
        if transform == "logprob":
            return self.log_probabilities(logits)[:, self.label_index]
        raise ValueError(f"reward.transform: unknown transform {transform!r}, accepted: logit, prob, logprob")

    def score(self, texts: Sequence[str], transform: str = "logit") -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards (``logit``, ``prob`` or ``logprob`` of the reward label) and toxicity, from one forward pass."""
        logits = self.logits(texts)
        return self.reward(logits, transform), self.log_probabilities(logits)[:, self.toxic_index].exp()


def load_sequence_classifier(location: str, *, field: str, fix: str, device: str | torch.device = "cpu",
                             trust_remote_code: bool = False, what: str = "sequence classifier"):
    """(model on ``device`` in eval mode, tokenizer) of a trained sequence classifier at ``location``.

    A model whose classification head is not in the checkpoint (a base or seq2seq model that transformers would
    give a random head) is a :class:`ModelLoadError` naming ``field``, with ``fix``; so is a location that
    cannot be loaded. Shared by the toxicity judges and the faithfulness judge."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = resolve_device(device) if isinstance(device, str) else device
    # (load_pretrained keeps transformers' MISSING-weights table off the terminal: the error below says it)
    model, info = load_pretrained(AutoModelForSequenceClassification, location, field=field, what=what,
                                  trust_remote_code=trust_remote_code, output_loading_info=True)
    prefix = getattr(model, "base_model_prefix", "") or ""
    untrained = sorted(k for k in info.get("missing_keys") or [] if not (prefix and k.startswith(prefix + ".")))
    if untrained:
        raise ModelLoadError(f"is not a trained sequence classifier: {type(model).__name__}'s classification "
                             f"head would start from random weights ({len(untrained)} missing, e.g. "
                             f"{untrained[0]})", field=field, value=location, fix=fix)
    tokenizer = load_pretrained(AutoTokenizer, location, field=field, what="classifier tokenizer",
                                trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer


def input_limit(model, tokenizer, max_length: int | None = None, field: str = "reward.max_length") -> int:
    """The most tokens one input of a classifier may have: ``max_length`` when given (a ConfigError naming ``field``
    when the model's position embeddings cannot hold it), else the tokenizer's ``model_max_length`` and the
    model's position embeddings (:func:`harness.judges.position_limit`), at most 512."""
    positions = position_limit(getattr(model.config, "model_type", None),
                               getattr(model.config, "max_position_embeddings", None))
    if max_length:
        error = too_long(int(max_length), positions, getattr(model.config, "_name_or_path", "") or "the classifier",
                         field)
        if error is not None:
            raise error
        return int(max_length)
    limit = getattr(tokenizer, "model_max_length", 512) or 512
    return int(min(limit, positions or 512, 512))


def load_judges(cfg, device) -> tuple[Classifier, Classifier | None]:
    """The run's reward classifier (``reward.*``) and, when ``eval.second_classifier`` is set, the
    independent second judge, both on ``device``."""
    reward = Classifier.load(cfg.reward.model, label=cfg.reward.label, toxic_label=cfg.reward.toxic_label,
                             batch_size=cfg.reward.batch_size, max_length=cfg.reward.max_length, device=device,
                             trust_remote_code=cfg.reward.trust_remote_code)
    second = None
    if cfg.eval.second_classifier:
        second = Classifier.load(cfg.eval.second_classifier, label=cfg.eval.second_toxic_label,
                                 toxic_label=cfg.eval.second_toxic_label, batch_size=cfg.reward.batch_size,
                                 device=device, field="eval.second_classifier")
    return reward, second


def _model_field(field: str) -> str:
    """The config field that names the classifier: ``reward.model``, or ``eval.second_classifier`` itself."""
    return field if field.startswith("eval.") else f"{field}.model"


def _label_fields(field: str) -> tuple[str, str]:
    """The config fields of the reward label and the toxic label for a classifier loaded under ``field``."""
    if field == "eval.second_classifier":  # the second judge has one label setting for both
        return "eval.second_toxic_label", "eval.second_toxic_label"
    return f"{field}.label", f"{field}.toxic_label"


def label_ids(config) -> dict[str, int]:
    """Label name -> index, from ``label2id`` checked against ``id2label`` and ``num_labels``."""
    num = int(getattr(config, "num_labels", 0) or 0)
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    # a config edited by hand can hold names in id2label only (label2id left at LABEL_0...), or vice versa:
    # id2label is what the model's outputs mean, so it wins when the two disagree
    if id2label and {v: k for k, v in id2label.items()} != label2id:
        label2id = {v: k for k, v in id2label.items()}
    if num:
        label2id = {k: v for k, v in label2id.items() if 0 <= v < num}
    return label2id


def reward_texts(queries: Sequence[str], responses: Sequence[str], mode: str = "query+response") -> list[str]:
    """What the classifier reads: query + response (the reference) or the response alone.

    A space joins the two when the query does not end in whitespace (decoded T5 queries lose their
    trailing newline), so the last prompt word and the first summary word stay two words.
    """
    if mode == "response":
        return list(responses)
    return [q + r if not q or q[-1].isspace() else f"{q} {r}" for q, r in zip(queries, responses)]
