"""Supervised fine-tuning of a seq2seq model on (prompt -> summary) pairs: the recipe's warm start.

:func:`train` is the one training loop for supervised summarization in the project: ``detox-harness sft``
(a LoRA adapter on FLAN-T5 or the tiny policy, :func:`harness.pipeline.sft`) and the tiny world's
builder (its policy, a small T5 trained in full from random weights, :mod:`harness.tiny`) both call it.
It runs transformers' ``Seq2SeqTrainer`` (AdamW, the scheduler, gradient clipping, the progress bar,
checkpoints and ``resume_from_checkpoint``) on already tokenized prompts, and validates with the
Trainer's loss and a greedy ROUGE-L (:func:`harness.metrics.rouge_best`) of the validation pairs.

The inputs are token ids (the prompts exactly as PPO will read them, cut at the run's prompt limit) and
reference summaries as text (cut at ``max_target_tokens``). Nothing here loads a model or a dataset.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import SFTConfig
from .metrics import rouge_best

RESULT_FILE = "sft.json"
CHECKPOINTS = "checkpoints"
START_FILE = "validation_start.json"
PENDING_FILE = "settings.json"  # the settings of a warm start not finished yet (its checkpoints are resumable)
#: what a warm start's directory holds besides the adapter and tokenizer files save_pretrained writes
OWN_FILES = frozenset({RESULT_FILE, CHECKPOINTS, START_FILE, PENDING_FILE})


@dataclass
class Pairs:
    """Prompts as token ids and their reference summaries (for validation, every reference of a prompt)."""

    sources: list[list[int]]
    targets: list[str]
    references: list[list[str]] = field(default_factory=list)

    def __post_init__(self):
        if len(self.sources) != len(self.targets):
            raise ValueError(f"{len(self.sources)} prompts but {len(self.targets)} targets")
        if not self.references:
            self.references = [[t] for t in self.targets]

    def __len__(self) -> int:
        return len(self.sources)


@dataclass
class SFTResult:
    """What a supervised run did: the steps, the training loss, the validation figures, the time."""

    steps: int
    train_rows: int
    validation_rows: int
    final_train_loss: float | None
    validation: list[dict]  # one {"step", "loss", "rougeL"} per validation, in order
    seconds: float
    trainable_parameters: int
    resumed_from: str | None = None
    loss_history: list[dict] = field(default_factory=list)  # the Trainer's {"step", "loss"} log lines

    @property
    def final(self) -> dict:
        return self.validation[-1] if self.validation else {}

    def to_json(self) -> dict:
        return asdict(self)


def _dataset(pairs: Pairs, tokenizer, max_target_tokens: int):
    from datasets import Dataset

    labels = tokenizer(list(pairs.targets), truncation=True, max_length=max_target_tokens)["input_ids"]
    return Dataset.from_dict({"input_ids": [list(s) for s in pairs.sources],
                              "attention_mask": [[1] * len(s) for s in pairs.sources], "labels": labels})


def greedy_summaries(model, tokenizer, sources: Sequence[Sequence[int]], *, max_new_tokens: int,
                     batch_size: int = 32) -> list[str]:
    """Greedy decoding of each prompt (left as it is, in eval mode), in batches; the decoded texts."""
    import torch

    device = next(model.parameters()).device
    texts: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(sources), batch_size):
                batch = tokenizer.pad({"input_ids": [list(s) for s in sources[i:i + batch_size]]},
                                      return_tensors="pt").to(device)
                out = model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                     min_new_tokens=0)
                texts.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts


def validation_rouge(model, tokenizer, pairs: Pairs, max_new_tokens: int) -> float:
    """Mean best-reference ROUGE-L (F1) of the model's greedy summaries of ``pairs``."""
    texts = greedy_summaries(model, tokenizer, pairs.sources, max_new_tokens=max_new_tokens)
    scores = [rouge_best(t, refs) for t, refs in zip(texts, pairs.references)]
    scores = [s["rougeL"] for s in scores if s is not None]
    return float(sum(scores) / len(scores)) if scores else float("nan")


def latest_checkpoint(directory: Path) -> Path | None:
    """The Trainer checkpoint (``checkpoint-N``) with the highest N under ``directory``, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(directory)) if Path(directory).is_dir() else None
    return Path(last) if last else None


def train(model, tokenizer, train_pairs: Pairs, validation_pairs: Pairs | None, cfg: SFTConfig, *,
          work_dir: Path, seed: int, progress: bool = True, resume: bool = False, device: str = "cpu",
          validate_start: bool = True, callbacks: Sequence = ()) -> SFTResult:
    """Fine-tune ``model`` (a peft LoRA model, or a plain model trained in full) on ``train_pairs``.

    ``work_dir`` holds the Trainer's checkpoints (every ``cfg.checkpoint_every`` steps; none when 0);
    ``resume`` continues from the newest of them (optimizer, scheduler, RNG state and data order
    included, so a resumed run ends where an uninterrupted one does). Validation (loss and greedy ROUGE-L
    on ``validation_pairs``) runs every ``cfg.eval_every`` steps and after the last step, and before the
    first one when ``validate_start`` (the figures the warm start is judged against). ``callbacks``: more
    ``transformers.TrainerCallback`` objects for the Trainer. The model is left trained, in eval mode;
    saving it is the caller's.
    """
    from transformers import (
        DataCollatorForSeq2Seq,
        PrinterCallback,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        TrainerCallback,
    )

    t0 = time.time()
    work_dir = Path(work_dir)
    rouge_at: dict[int, float] = {}

    class ValidationRouge(TrainerCallback):
        """After each of the Trainer's evaluations (the loss), the greedy ROUGE-L of the validation pairs, added
        to that evaluation's log entry (so it is saved with the Trainer's state and survives a resume)."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            rouge_at[state.global_step] = validation_rouge(model, tokenizer, validation_pairs,
                                                           cfg.generation_max_new_tokens)
            for entry in reversed(state.log_history):
                if "eval_loss" in entry and entry.get("step") == state.global_step:
                    entry["eval_rougeL"] = rouge_at[state.global_step]
                    break

    evaluating = validation_pairs is not None and len(validation_pairs) > 0
    every_eval = evaluating and 0 < cfg.eval_every < cfg.steps
    args = Seq2SeqTrainingArguments(
        output_dir=str(work_dir / CHECKPOINTS), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=max(cfg.batch_size, 32), learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, eval_strategy="steps" if every_eval else "no",
        eval_steps=cfg.eval_every if every_eval else None,
        save_strategy="steps" if cfg.checkpoint_every else "no", save_steps=cfg.checkpoint_every or None,
        save_total_limit=2 if cfg.checkpoint_every else None, logging_steps=max(1, min(50, cfg.steps // 20)),
        report_to="none", seed=seed, data_seed=seed, use_cpu=device == "cpu", disable_tqdm=not progress,
        dataloader_num_workers=0, remove_unused_columns=False, save_only_model=False,
    )
    train_ds = _dataset(train_pairs, tokenizer, cfg.max_target_tokens)
    eval_ds = _dataset(validation_pairs, tokenizer, cfg.max_target_tokens) if evaluating else None
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    trainer = Seq2SeqTrainer(model=model, args=args, data_collator=collator, train_dataset=train_ds,
                             eval_dataset=eval_ds, processing_class=tokenizer,
                             callbacks=([ValidationRouge()] if evaluating else []) + list(callbacks))
    if not progress:
        trainer.remove_callback(PrinterCallback)  # no dict per log line on the terminal either
    start = latest_checkpoint(work_dir / CHECKPOINTS) if resume else None
    first_file = work_dir / START_FILE  # the step-0 validation (train() starts a new Trainer state)
    first: list[dict] = []
    if evaluating and validate_start:
        if start is not None and first_file.is_file():
            first = json.loads(first_file.read_text(encoding="utf-8"))
        elif start is None:
            metrics = trainer.evaluate()  # step 0: where the warm start began
            first = [{"step": 0, "eval_loss": float(metrics["eval_loss"]), "eval_rougeL": rouge_at.get(0)}]
            if cfg.checkpoint_every:
                work_dir.mkdir(parents=True, exist_ok=True)
                first_file.write_text(json.dumps(first), encoding="utf-8")
    output = trainer.train(resume_from_checkpoint=str(start) if start else None)
    if evaluating and trainer.state.global_step not in rouge_at:
        trainer.evaluate()  # the final validation (loss and ROUGE-L), after the last step
    model.eval()
    history = first + trainer.state.log_history
    losses = [{"step": int(h["step"]), "loss": float(h["loss"])} for h in history if "loss" in h]
    validation = [{"step": int(h["step"]), "loss": float(h["eval_loss"]), "rougeL": h.get("eval_rougeL")}
                  for h in history if "eval_loss" in h]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del trainer
    return SFTResult(steps=cfg.steps, train_rows=len(train_pairs),
                     validation_rows=len(validation_pairs) if evaluating else 0,
                     final_train_loss=losses[-1]["loss"] if losses else float(output.training_loss),
                     validation=validation, seconds=time.time() - t0, trainable_parameters=trainable,
                     resumed_from=str(start) if start else None, loss_history=losses)


def write_result(directory: Path, result: SFTResult, settings: dict) -> dict:
    """``sft.json`` beside the adapter (written last: it marks the adapter complete): what the run did and
    the settings it was made with. Returns what it wrote, as :func:`read_result` reads it."""
    from .results import jsonable, write_json

    data = jsonable({"result": result.to_json(), "settings": settings})
    write_json(Path(directory) / RESULT_FILE, data)
    return data


def read_result(directory: Path) -> dict | None:
    """The ``sft.json`` of a finished warm start, or None (none yet, or unreadable)."""
    try:
        data = json.loads((Path(directory) / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "settings" in data and "result" in data else None
