"""``detox-harness sft`` (and the first part of ``run --sft``): the supervised warm start, a LoRA adapter
trained on (prompt -> summary) with ``cfg.sft`` (:func:`harness.sft.train`)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .. import results as rf
from .. import rundir
from ..errors import HarnessError, environment_fault
from ..plan import RunPlan, sft_settings
from ..report.formats import fmt_num


def sft_metrics(saved: dict) -> dict:
    """``metrics.sft`` of a run from a warm start's ``sft.json``: its final validation figures."""
    result = saved["result"]
    history = result.get("validation") or [{}]
    final, first = history[-1], history[0]
    start = first.get("rougeL") if first.get("step") == 0 and len(history) > 1 else None
    gain = final.get("rougeL") - start if start is not None and final.get("rougeL") is not None else None
    return {"rougeL": final.get("rougeL"), "loss": final.get("loss"), "rougeL_start": start, "rougeL_gain": gain,
            "steps": int(result["steps"]), "seconds": float(result["seconds"]),
            "validation_rows": int(result["validation_rows"])}


def _check(settings: dict):
    """What the adapter directory may hold: nothing, or a warm start (finished or not) of the same settings."""
    from ..sft import OWN_FILES, PENDING_FILE, read_result

    def check(out: Path) -> None:
        rundir.require_warm_start_dir(out, OWN_FILES)
        saved = read_result(out)
        if saved is not None and saved["settings"] != settings:
            raise HarnessError("holds a warm-start adapter made with other settings", field="--output",
                               value=str(out), fix="choose another --output, or remove that directory")
        pending = out / PENDING_FILE
        if saved is None and pending.is_file():
            try:
                unfinished = rf.read_json(pending)
            except HarnessError:
                unfinished = None
            if unfinished != settings:
                raise HarnessError("holds an unfinished warm start with other settings (or unreadable ones)",
                                   field="--output", value=str(out),
                                   fix="choose another --output, or remove that directory")

    return check


def warm_start(plan: RunPlan, *, progress: bool = True, echo=print, callbacks=()) -> tuple[Path, dict]:
    """Execute a warm-start plan (:func:`harness.plan.plan_sft`); returns (adapter directory, ``sft.json``).

    A directory that already holds an adapter made with the same settings is reused as it is; one made with other
    settings is refused; unfinished work there (Trainer checkpoints of the same settings) is resumed. Training uses
    the PPO train part of ``data.split`` (its first 80%), so the prompts the PPO evaluation uses are never learned;
    validation uses ``sft.validation_split``. ``callbacks``: more ``transformers.TrainerCallback`` objects.
    """
    import torch

    from ..data import build_prompts, tokenized_prompts
    from ..models import TRAINED_ADAPTER, load_policy, resolve_device
    from ..sft import CHECKPOINTS, PENDING_FILE, START_FILE, read_result, write_result
    from ..sft import train as sft_train

    cfg, loads, out = plan.cfg, plan.loads, plan.run_dir
    settings = sft_settings(loads)
    with rundir.Claim(out, "sft", _check(settings)):
        saved = read_result(out)
        if saved is not None:
            echo(f"sft: reusing the adapter in {out} (made with the same settings)")
            return out, saved
        pending = out / PENDING_FILE
        try:
            rf.write_json(pending, settings)
        except OSError as e:
            raise environment_fault(e, f"writing {pending}") from e
        t0 = time.time()
        torch.manual_seed(cfg.seed)  # the fresh LoRA's initialization
        device = resolve_device(cfg.device)
        policy = load_policy(loads.policy, device=device)
        tok = policy.tokenizer
        train = build_prompts(loads.data, tok).train
        validation, _ = tokenized_prompts(loads.data, tok, cfg.sft.validation_split)
        if cfg.sft.validation_rows:
            validation = validation.select(range(min(cfg.sft.validation_rows, len(validation))))
        train_pairs, val_pairs = _pairs(train, cfg), _pairs(validation, cfg)
        resuming = (out / CHECKPOINTS).is_dir()
        echo(f"sft: {len(train_pairs)} train pairs, {len(val_pairs)} validation pairs ({cfg.sft.validation_split}), "
             f"{cfg.sft.steps} steps of {cfg.sft.batch_size} on {device}" + ("; resuming" if resuming else ""))
        result = sft_train(policy.model, tok, train_pairs, val_pairs, cfg.sft, work_dir=out, seed=cfg.seed,
                           progress=progress, resume=resuming, device=str(device), callbacks=callbacks)
        try:
            policy.model.save_pretrained(out, safe_serialization=True, selected_adapters=[TRAINED_ADAPTER])
            tok.save_pretrained(out)
            saved = write_result(out, result, settings)  # last: marks the adapter complete
        except OSError as e:
            raise environment_fault(e, f"saving the adapter to {out}") from e
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        (out / START_FILE).unlink(missing_ok=True)
        pending.unlink(missing_ok=True)
    final = result.final
    echo(f"sft: {result.steps} steps in {time.time() - t0:.1f}s; validation loss {fmt_num(final.get('loss'))}, "
         f"ROUGE-L {fmt_num(final.get('rougeL'))}; adapter {out} (policy.adapter={out})")
    return out, saved


def _pairs(ds, cfg):
    from ..sft import Pairs

    summaries = list(ds["summaries"])
    keep = [i for i, refs in enumerate(summaries) if refs]
    if not keep:
        raise HarnessError("the data has no reference summaries to learn from", field="data.path",
                           value=cfg.data.path, fix="give DialogSum-like data with a 'summary' column")
    ids = ds["input_ids"]
    return Pairs([ids[i] for i in keep], [summaries[i][0] for i in keep], [summaries[i] for i in keep])
