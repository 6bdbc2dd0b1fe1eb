"""The main job: evaluate before, train with PPO, evaluate after, verdict, results files, report.

``run(cfg)`` is what ``detox-harness run`` and the threshold suites call; ``evaluate_only(cfg, target)`` is
``detox-harness eval``. Each phase's output is written to the run directory as soon as it exists (the
"before" evaluation, PPO statistics after every step, checkpoints), so an interrupted run resumes without
redoing finished work. File names and formats: :mod:`harness.results`.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import results as rf
from .config import HarnessConfig
from .errors import (
    EXIT_BOUND_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PASS,
    EnvironmentFault,
    HarnessError,
    environment_fault,
    first_line,
)
from .metrics import PHASE_KEYS, EvalOutput, phase_metrics, training_summary
from .parallel import SINGLE, Parallel, launched_as_main
from .thresholds import text_table


@dataclass
class RunOutcome:
    run_dir: Path
    results: dict
    bounds: list = field(default_factory=list)
    passed: bool = True
    interrupted: bool = False
    report: Path | None = None
    baseline_checks: list = field(default_factory=list)  # baselines.MetricCheck, with --baseline
    verdict: object = None  # thresholds.Verdict: the bounds beside the preset's, the evidence, the status

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_PASS if self.passed else EXIT_BOUND_FAILED


def default_run_id(cfg: HarnessConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{cfg.preset}-s{cfg.seed}"


def resolve_run_dir(cfg: HarnessConfig, output: str | Path | None, resume: bool) -> Path:
    """``--output`` if given; with ``--resume`` and no output, the newest unfinished run of this preset."""
    if output:
        return Path(output)
    root = Path(cfg.output.dir)
    if resume:
        candidates = [p for p in root.glob(f"*-{cfg.preset}-s{cfg.seed}") if (p / rf.CHECKPOINTS_DIR).is_dir()
                      and not rf.is_finished(p)]
        if not candidates:
            raise HarnessError(f"no unfinished run of preset {cfg.preset} with seed {cfg.seed} under {root}",
                               field="--resume", fix="pass --output RUN_DIR of the run to continue")
        return max(candidates, key=lambda p: p.stat().st_mtime)
    return root / (cfg.output.run_id or default_run_id(cfg))


@dataclass
class RunInputs:
    """What a run or an evaluation loads before it generates anything."""

    device: object
    policy: object
    classifier: object
    second: object
    data: object
    seconds: float
    faithfulness: object = None  # the faithfulness judge (harness.faithfulness); None: eval.faithfulness_model is null


def load_inputs(cfg: HarnessConfig, *, min_train_rows: int = 1, device=None) -> RunInputs:
    """Seed torch with the run seed (the fresh LoRA's initialization depends on it), then load the policy, the
    reward classifier, the optional second judge, the optional faithfulness judge and the prompts (at least
    ``eval.num_samples`` test rows).
    ``device``: the process's device of a data-parallel run (accelerate's), instead of ``cfg.device``."""
    import torch

    from .data import build_prompts
    from .faithfulness import load_faithfulness_judge
    from .models import load_policy, resolve_device
    from .toxicity import load_judges

    t = time.time()
    torch.manual_seed(cfg.seed)
    device = device if device is not None else resolve_device(cfg.device)
    policy = load_policy(cfg.policy, device=device)
    classifier, second = load_judges(cfg, device)
    faithfulness = load_faithfulness_judge(cfg, device)
    data = build_prompts(cfg.data, policy.tokenizer, min_test_rows=cfg.eval.num_samples or 1,
                         min_train_rows=min_train_rows)
    return RunInputs(device, policy, classifier, second, data, time.time() - t, faithfulness)


def _fmt(value, spec: str = ".3f") -> str:
    """A figure for the terminal; ``-`` when it was not measured (None)."""
    return "-" if value is None else format(value, spec)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def phase_line(m: dict) -> str:
    """One evaluation's headline figures, for the terminal."""
    faithful = m.get("faithful_rate")
    return (f"toxicity {m['toxicity_mean']:.4f} +- {m['toxicity_std']:.4f}, "
            f"faithfulness {_fmt(m.get('faithfulness_mean'), '.4f')}"
            + (f" ({100 * faithful:.0f}% faithful)" if faithful is not None else "")
            + f", reward {m['reward_mean']:.3f}, ROUGE-L {_fmt(m['rougeL'])}")


#: settings ``--resume`` may change: they do not change what the finished run computes (``ppo.steps``
#: extends or shortens it: each step's data and seeds depend on the step alone)
RESUMABLE_KEYS = ("ppo.steps", "ppo.checkpoint_every", "output.report", "eval.batch_size", "reward.batch_size",
                  "eval.faithfulness_batch_size")


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (``path`` itself, or a new parent of it)."""
    path = Path(os.path.abspath(path))
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def _has_started(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in (rf.CHECKPOINTS_DIR, rf.TRAIN_STATS_FILE, rf.BEFORE_FILE))


def _resumed_config(run_dir: Path, overrides: list[str], echo) -> HarnessConfig:
    """The saved config of ``run_dir`` with those ``overrides`` that may change on resume (others refused)."""
    from .config import apply_overrides, changed_keys, config_from_dict, read_settings

    try:  # as strictly as a --config file: no aliases, no duplicate keys (a refusal names the key and line)
        data = read_settings(run_dir / rf.CONFIG_FILE, "--output")
        if not isinstance(data, dict):
            raise ValueError("it holds no mapping of settings")
        saved = config_from_dict(data)
    except HarnessError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise HarnessError(f"its config.yaml cannot be read ({first_line(e)})", field="--output", value=str(run_dir),
                           fix="restore the run's config.yaml, or start a new run") from e
    saved = _bounds_from_preset(saved, data.get("thresholds"), overrides, echo)
    if not overrides:
        echo(f"resuming {run_dir} with its saved config")
        return saved
    wanted = apply_overrides(copy.deepcopy(saved), overrides)
    changed = changed_keys(saved, wanted)
    refused = [k for k in changed if k not in RESUMABLE_KEYS and not k.startswith("thresholds.")]
    if refused:
        raise HarnessError(f"--resume continues the run with its saved config; these settings would change what "
                           f"it computes: {', '.join(refused)}", field="--resume",
                           fix=f"drop them (resume may change only {', '.join(RESUMABLE_KEYS)}), or start a new "
                               "run with another --output")
    echo(f"resuming {run_dir} with its saved config" + (f", changing {', '.join(changed)}" if changed else ""))
    return wanted


def _bounds_from_preset(cfg: HarnessConfig, saved_bounds, overrides: list[str], echo) -> HarnessConfig:
    """``cfg`` with the bounds of its preset and the command line's ``thresholds.*`` overrides, never those of the
    run's editable config.yaml: bounds written there (an emptied ``thresholds: {}``, a loosened limit) are
    ignored, and said so."""
    from .config import apply_overrides
    from .thresholds import load_bounds

    cfg = copy.deepcopy(cfg)
    cfg.thresholds = load_bounds(cfg.preset)
    cfg = apply_overrides(cfg, [o for o in overrides if o.strip().startswith("thresholds.")])
    saved_bounds = saved_bounds if isinstance(saved_bounds, dict) else {}
    differ = sorted(k for k in set(saved_bounds) | set(cfg.thresholds) if saved_bounds.get(k) != cfg.thresholds.get(k))
    if differ:
        echo(f"resume: the bounds come from preset {cfg.preset} and the command line, not from config.yaml "
             f"(its {', '.join(differ)} differ and are not used; give thresholds.NAME=VALUE to change a bound)")
    return cfg


def _resume_hint(cfg: HarnessConfig, run_dir: Path) -> str:
    from .ppo.trainer import latest_checkpoint

    last = latest_checkpoint(run_dir / rf.CHECKPOINTS_DIR)
    where = f"last checkpoint {last}" if last else "no checkpoint yet"
    return f"{where}; continue with: detox-harness run --preset {cfg.preset} --output {run_dir} --resume"


def run(cfg: HarnessConfig, *, output: str | Path | None = None, resume: bool = False, progress: bool = True,
        echo=print, baseline: str | Path | None = None, overrides: list[str] | None = None,
        sft: bool = False, accept_loosened: bool = False) -> RunOutcome:
    """Run the whole job; returns the outcome (results, bounds, exit code).

    ``accept_loosened`` (``--accept-loosened-bounds``): bounds loosened against the preset's do not fail the run
    by themselves; the verdict then reads "PASS with loosened bounds", never PASS (:func:`harness.thresholds.judge`).

    ``sft``: the whole recipe: first the supervised warm start (:func:`warm_start`: made, or reused from the
    cache when one was made with the same settings), then PPO from that adapter, judged from where it
    started. A resumed run keeps the adapter its saved config names.

    ``baseline``: a baseline file (:mod:`harness.baselines`); the run then also fails when a guarded metric
    leaves the baseline's tolerance. Its config is checked against the run's before anything runs.
    ``resume``: continue ``output`` with its saved config; ``overrides`` (the command line's settings) may
    change only :data:`RESUMABLE_KEYS`. Without ``resume``, a directory holding an unfinished run is refused.

    A run directory this call created is removed again when the inputs fail to load (no stub is left). A
    file-system fault (a path that cannot be written, a full disk) raises an :class:`EnvironmentFault` that
    names the last checkpoint and the resume command; any other unexpected exception gets its traceback
    written to the run's ``run.log`` (a note on the exception says where).

    Under ``accelerate launch`` with several processes (``detox-harness run --num-processes N``) the run is
    data-parallel (docs/scale.md): every process evaluates and trains on its share and gets the same numbers;
    the main process alone prints and writes the run directory.
    """
    from . import baselines

    if not launched_as_main():  # the main process prints; the others' warnings would repeat its own
        echo = _silent
        logging.getLogger("harness").setLevel(logging.ERROR)
    base = baselines.load_baseline(baseline) if baseline is not None else None
    run_dir = resolve_run_dir(cfg, output, resume)
    if run_dir.exists() and not run_dir.is_dir():
        raise EnvironmentFault("is a file, not a directory", field="--output", value=str(run_dir),
                               fix="give a directory path for the run")
    if rf.is_finished(run_dir) and not resume:
        raise HarnessError("the run directory already holds a finished run", field="--output", value=str(run_dir),
                           fix="choose a new --output (or omit it for a fresh run id)")
    if not resume and run_dir.is_dir() and _has_started(run_dir):
        raise HarnessError("the run directory holds an unfinished run", field="--output", value=str(run_dir),
                           fix="continue it with --resume, or choose a new --output")
    if resume:
        if not (run_dir / rf.CONFIG_FILE).is_file():
            raise HarnessError("holds no run to resume (no config.yaml)", field="--output", value=str(run_dir),
                               fix="give the directory of the interrupted run")
        cfg = _resumed_config(run_dir, overrides or [], echo)
    from .judges import check_judges

    check_judges(cfg)  # labels and judges that cannot measure what the verdict claims: refused before any loading
    _warn_about_the_verdict(cfg, accept_loosened, echo)
    if sft and not resume:
        if cfg.policy.adapter:
            raise HarnessError("--sft makes the starting adapter itself", field="policy.adapter",
                               value=cfg.policy.adapter, fix="drop policy.adapter, or drop --sft to start from it")
        adapter, _ = warm_start(cfg, progress=progress, echo=echo)
        cfg = copy.deepcopy(cfg)
        cfg.policy.adapter = str(adapter)
    if base is not None:
        from .tiny import worlds_of

        baselines.require_same_config(rf.jsonable(cfg.to_dict()), base, str(baseline))
        baselines.require_same_world(worlds_of(cfg.locations()), base, str(baseline))
    parallel = Parallel.from_environment(cfg.device)
    parallel.check_divides(cfg.ppo.batch_size, "ppo.batch_size")  # before minutes of loading and evaluating
    parallel.check_divides(cfg.ppo.mini_batch_size, "ppo.mini_batch_size")
    parallel.wait()  # every process has checked the directory before the main process writes into it
    created = _first_missing(run_dir)  # what to remove again when the inputs fail to load
    if parallel.is_main:
        try:  # a path that cannot be written fails here, before minutes of loading
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise environment_fault(e, f"creating the run directory {run_dir}") from e
    try:
        inputs = load_inputs(cfg, min_train_rows=cfg.ppo.batch_size, device=parallel.device)
    except BaseException:
        if created is not None and parallel.is_main:  # bad input leaves no stub directory behind, nor its
            shutil.rmtree(created, ignore_errors=True)  # new parents (--output a/b/run made a and b)
        raise
    log_handler = _open_run_log(run_dir) if parallel.is_main else None
    try:
        return _run(cfg, run_dir, inputs, base, baseline, resume=resume, progress=progress and parallel.is_main,
                    echo=echo, parallel=parallel, accept_loosened=accept_loosened)
    except HarnessError as e:
        if isinstance(e, EnvironmentFault):
            raise EnvironmentFault(f"{e}; {_resume_hint(cfg, run_dir)}") from e
        raise
    except OSError as e:
        fault = environment_fault(e, "the run")
        raise EnvironmentFault(f"{fault}; {_resume_hint(cfg, run_dir)}") from e
    except Exception as e:
        if log_handler is None:  # not the main process: the main one writes run.log
            raise
        # straight into the file: through logging, the root logger's terminal handler would print it too
        try:
            import traceback

            with open(log_handler.baseFilename, "a", encoding="utf-8") as f:
                f.write("the run failed with an unexpected exception:\n" + "".join(traceback.format_exception(e)))
            e.add_note(f"traceback: {log_handler.baseFilename}")
        except OSError:
            pass  # the CLI writes it to a temporary file instead
        e.add_note(f"resume: {_resume_hint(cfg, run_dir)}")
        raise
    finally:
        if log_handler is not None:
            _close_run_log(log_handler)


def _warn_about_the_verdict(cfg: HarnessConfig, accept_loosened: bool, echo) -> None:
    """Say at the start what will keep the verdict from a plain PASS whatever the run measures: bounds loosened
    or removed against the preset, an evaluation smaller than the preset's least evidence."""
    from .thresholds import bound_change, load_bounds, load_evidence

    preset = load_bounds(cfg.preset)
    for name in sorted(set(preset) | set(cfg.thresholds)):
        change = bound_change(name, cfg.thresholds.get(name), preset.get(name))
        if change in ("loosened", "removed"):
            then = ("the verdict can at best read PASS with loosened bounds" if change == "loosened" and accept_loosened
                    else "the run fails")
            echo(f"warning: thresholds.{name} is {change} against preset {cfg.preset} "
                 f"({cfg.thresholds.get(name)} vs {preset.get(name)}): {then}")
    least = load_evidence(cfg.preset)
    for key, setting, value in (("min_num_samples", "eval.num_samples", cfg.eval.num_samples),
                                ("min_bootstrap_resamples", "eval.bootstrap_resamples", cfg.eval.bootstrap_resamples)):
        if key in least and value is not None and value < least[key]:
            echo(f"warning: {setting}={value} is below preset {cfg.preset}'s least evidence ({least[key]}): the "
                 "verdict will be FAIL (not enough evidence)")


def _silent(*args, **kwargs) -> None:
    """``echo`` of the processes other than the main one."""


class _RunLog(logging.FileHandler):
    """``run.log``: a line that cannot be written (a full disk) is dropped quietly, not reported with logging's
    own traceback on the terminal; the run's real fault, if any, is reported once by the CLI."""

    def handleError(self, record):  # noqa: N802 (logging's name)
        self.failed = getattr(self, "failed", 0) + 1


def _open_run_log(run_dir: Path) -> logging.FileHandler:
    """Append the harness's warnings (and an unexpected traceback) to ``run_dir/run.log`` while the run lasts."""
    handler = _RunLog(run_dir / rf.LOG_FILE, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("harness").addHandler(handler)
    return handler


def _close_run_log(handler: logging.FileHandler) -> None:
    logging.getLogger("harness").removeHandler(handler)
    handler.close()


def _run(cfg: HarnessConfig, run_dir: Path, inputs: RunInputs, base, baseline, *, resume: bool, progress: bool,
         echo, parallel: Parallel = SINGLE, accept_loosened: bool = False) -> RunOutcome:
    from . import baselines
    from .evaluation import evaluate_policy, select_prompts
    from .models import count_parameters, format_parameter_count
    from .ppo.trainer import PPOTrainer
    from .thresholds import judge, load_bounds, load_evidence

    t_start = time.time() - inputs.seconds
    main = parallel.is_main
    if main:
        cfg.save(run_dir / rf.CONFIG_FILE)
    device, policy, classifier, second, data = (inputs.device, inputs.policy, inputs.classifier, inputs.second,
                                                 inputs.data)
    timings: dict[str, float] = {"load_s": inputs.seconds}
    echo(f"run {run_dir.name}: preset {cfg.preset}, seed {cfg.seed}, device {device}"
         + (f", {parallel.world_size} processes" if parallel.distributed else ""))
    echo(format_parameter_count(count_parameters(policy)))
    echo(f"data: {data.stats['kept']} dialogues kept of {data.stats['dialogues']} "
         f"({data.stats['train']} train / {data.stats['test']} test prompts, "
         f"{data.stats['truncated_prompts']} truncated to {data.stats['max_prompt_tokens']} tokens"
         + (f"; {data.stats['test_overlap_removed']} test prompts removed: their dialogue is a training dialogue "
            "(case, white space and punctuation aside)" if data.stats.get("test_overlap_removed") else "") + ")")
    test = select_prompts(data.test, cfg.eval.num_samples)

    # "before" is where training starts: the starting adapter itself when the KL reference is the bare base
    # (policy.reference=base), evaluated before any step, so that its old effect is never counted as this run's
    start_is_reference = not (cfg.policy.adapter and cfg.policy.reference == "base")

    def evaluated_once(name: str, *, base: bool = False) -> EvalOutput:
        """The reference's (or the bare base's) evaluation, saved in ``name``: a resumed run reuses it."""
        path = run_dir / name
        if resume and path.exists():
            echo(f"{'base' if base else 'before'}: reused the saved evaluation")
            saved = EvalOutput.from_json(rf.read_json(path))
            if not set(PHASE_KEYS) <= set(saved.metrics):  # saved before a figure existed: summarize its rows again
                saved.metrics = phase_metrics(saved.samples, cfg)
            return saved
        out = evaluate_policy(policy, classifier, test, cfg, use_reference=base or start_is_reference, base=base,
                              second_classifier=second, faithfulness_judge=inputs.faithfulness, progress=progress,
                              parallel=parallel)
        if main:
            rf.write_json(path, out.to_json(), indent=None)
        return out

    before = evaluated_once(rf.BEFORE_FILE)
    timings["eval_before_s"] = before.seconds
    echo(f"before: {phase_line(before.metrics)}")
    policies = None
    if cfg.policy.adapter:  # "before" is the starting adapter: the bare base model is evaluated too
        base_eval = evaluated_once(rf.BASE_FILE, base=True)
        timings["eval_base_s"] = base_eval.seconds
        echo(f"base (adapters off): {phase_line(base_eval.metrics)}")
        from .sft import read_result

        policies = {"base": base_eval.metrics,
                    "start": {"adapter": str(cfg.policy.adapter), "sft": read_result(Path(cfg.policy.adapter))}}

    t = time.time()
    trainer = PPOTrainer(cfg, policy, classifier, data.train, run_dir, parallel=parallel)
    if resume:
        ckpt = trainer.resume()
        if trainer.step > cfg.ppo.steps:
            raise HarnessError(f"the run's last checkpoint is at step {trainer.step}, past ppo.steps = {cfg.ppo.steps}",
                               field="ppo.steps", fix=f"give ppo.steps={trainer.step} or more to finish it")
        echo(f"resumed from {ckpt} (step {trainer.step})" if ckpt else "no checkpoint found: training from step 0")
    elif main and trainer.stats_path.exists():
        trainer.stats_path.unlink()
    result = trainer.train(progress=progress)
    timings["train_s"] = time.time() - t
    stats = rf.read_jsonl(trainer.stats_path, missing_ok=True)
    if result.interrupted:
        echo(f"interrupted after step {result.steps_done}; checkpoint {result.checkpoint}. "
             f"Continue with: detox-harness run --preset {cfg.preset} --output {run_dir} --resume")
        return RunOutcome(run_dir=run_dir, results={}, interrupted=True)

    after = evaluate_policy(policy, classifier, test, cfg, use_reference=False, second_classifier=second,
                            faithfulness_judge=inputs.faithfulness, progress=progress, parallel=parallel)
    timings["eval_after_s"] = after.seconds
    timings["total_s"] = time.time() - t_start
    from .tiny import worlds_of

    extra = {"data": data.stats, "parameters": count_parameters(policy), "checkpoint": result.checkpoint,
             "processes": parallel.world_size, "worlds": worlds_of(cfg.locations())}
    if policies is not None:
        extra["policies"] = policies
    results, samples = rf.build_results(cfg, before, after, run_id=run_dir.name, training=training_summary(stats),
                                        timings=timings, device=str(device), extra=extra)
    if policies is not None and policies["start"]["sft"]:
        results["metrics"]["sft"] = sft_metrics(policies["start"]["sft"])
    judged = judge(results, cfg.thresholds, load_bounds(cfg.preset), evidence=load_evidence(cfg.preset),
                   accept_loosened=accept_loosened)
    bounds = judged.bounds
    results["verdict"] = judged.to_dict()
    checks = []
    if base is not None:
        checks = baselines.compare(results, base, baseline_name=str(baseline))
        results["baseline"] = {"file": str(baseline), "passed": all(c.passed for c in checks),
                               "seeds": base["seeds"], "checks": [c.to_dict() for c in checks]}
    if main:
        rf.write_run_files(run_dir, results, samples)
    outcome = RunOutcome(run_dir=run_dir, results=results, bounds=bounds,
                         passed=judged.passed and all(c.passed for c in checks), baseline_checks=checks, verdict=judged)
    if cfg.output.report and main:
        from .report import render_index, render_run

        outcome.report = render_run(run_dir)
        render_index(run_dir.parent)
    return outcome


# ------------------------------------------------------------------------------------ the warm start

def sft_settings(cfg: HarnessConfig) -> dict:
    """Everything a warm-start adapter depends on (a tiny-world id stands for its built directory, whose
    name carries the builder's version): equal settings, equal adapter."""
    from .models import resolve_location

    def where(location):
        return resolve_location(location) if str(location).startswith("tiny://") else location

    p = cfg.policy
    return rf.jsonable({"policy": {"model": where(p.model), "adapter": where(p.adapter) if p.adapter else None,
                                   "dtype": p.dtype, "lora_r": p.lora_r, "lora_alpha": p.lora_alpha,
                                   "lora_target_modules": list(p.lora_target_modules)},
                        "data": {**cfg.data.__dict__, "path": where(cfg.data.path)},
                        "sft": dict(cfg.sft.__dict__), "seed": cfg.seed, "device": cfg.device})


def sft_cache_dir(cfg: HarnessConfig) -> Path:
    """``<cache>/sft/<preset>-<hash of sft_settings>``: where ``run --sft`` keeps (and finds) its adapter."""
    import hashlib
    import json

    from .tiny import cache_root

    digest = hashlib.sha256(json.dumps(sft_settings(cfg), sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "sft" / f"{cfg.preset}-{digest}"


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


def warm_start(cfg: HarnessConfig, output: str | Path | None = None, *, progress: bool = True,
               echo=print, callbacks=()) -> tuple[Path, dict]:
    """``detox-harness sft``: LoRA instruction fine-tuning of ``policy.model`` on (prompt -> summary) with
    ``cfg.sft`` (:func:`harness.sft.train`); the adapter is written with ``save_pretrained`` into ``output``
    (default :func:`sft_cache_dir`) with ``sft.json``. Returns (adapter directory, ``sft.json``'s content).

    A directory that already holds an adapter made with the same settings is reused as it is; one made
    with other settings is refused; unfinished work there (Trainer checkpoints of the same settings) is
    resumed. Training uses the PPO train part of ``data.split`` (its first 80%), so the prompts the PPO
    evaluation uses are never learned; validation uses ``sft.validation_split``. ``callbacks``: more
    ``transformers.TrainerCallback`` objects for the Trainer (logging, early stopping, ...).
    """
    import torch

    from .data import build_prompts, tokenized_prompts
    from .models import TRAINED_ADAPTER, load_policy, resolve_device
    from .sft import CHECKPOINTS, START_FILE, Pairs, read_result, write_result
    from .sft import train as sft_train

    if not cfg.policy.use_lora:
        raise HarnessError("the warm start trains a LoRA adapter", field="policy.use_lora",
                           fix="set policy.use_lora=true")
    out = Path(output) if output else sft_cache_dir(cfg)
    settings = sft_settings(cfg)
    saved = read_result(out)
    if saved is not None:
        if saved["settings"] != settings:
            raise HarnessError("holds a warm-start adapter made with other settings", field="--output",
                               value=str(out), fix="choose another --output, or remove that directory")
        echo(f"sft: reusing the adapter in {out} (made with the same settings)")
        return out, saved
    if out.exists() and not out.is_dir():
        raise EnvironmentFault("is a file, not a directory", field="--output", value=str(out),
                               fix="give a directory path for the adapter")
    pending = out / "settings.json"
    if pending.is_file():
        try:
            unfinished = rf.read_json(pending)
        except HarnessError:  # an unreadable settings file: its checkpoints cannot be trusted, start over
            unfinished = settings
            shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        if unfinished != settings:
            raise HarnessError("holds an unfinished warm start with other settings", field="--output",
                               value=str(out), fix="choose another --output, or remove that directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        rf.write_json(pending, settings)
    except OSError as e:
        raise environment_fault(e, f"creating the adapter directory {out}") from e
    t0 = time.time()
    torch.manual_seed(cfg.seed)  # the fresh LoRA's initialization
    device = resolve_device(cfg.device)
    policy = load_policy(cfg.policy, device=device)
    tok = policy.tokenizer
    train = build_prompts(cfg.data, tok).train
    validation, _ = tokenized_prompts(cfg.data, tok, cfg.sft.validation_split)
    if cfg.sft.validation_rows:
        validation = validation.select(range(min(cfg.sft.validation_rows, len(validation))))

    def pairs(ds) -> Pairs:
        summaries = list(ds["summaries"])
        keep = [i for i, refs in enumerate(summaries) if refs]
        if not keep:
            raise HarnessError("the data has no reference summaries to learn from", field="data.path",
                               value=cfg.data.path, fix="give DialogSum-like data with a 'summary' column")
        ids = ds["input_ids"]
        return Pairs([ids[i] for i in keep], [summaries[i][0] for i in keep], [summaries[i] for i in keep])

    train_pairs, val_pairs = pairs(train), pairs(validation)
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
    echo(f"sft: {result.steps} steps in {time.time() - t0:.1f}s; validation loss {_fmt(final.get('loss'))}, "
         f"ROUGE-L {_fmt(final.get('rougeL'))}; adapter {out} (policy.adapter={out})")
    return out, saved


def resolve_target(target: str | Path) -> Path:
    """An adapter or checkpoint directory; a run directory or a ``checkpoints`` folder means its latest checkpoint."""
    from .ppo.trainer import latest_checkpoint

    path = Path(target).expanduser()
    if not path.is_dir():
        raise HarnessError("is not a directory", field="--target", value=str(path),
                           fix="give an adapter or checkpoint directory (it holds adapter_config.json)")
    if (path / "adapter_config.json").is_file():
        return path
    for folder in (path / rf.CHECKPOINTS_DIR, path):
        last = latest_checkpoint(folder) if folder.is_dir() else None
        if last is not None:
            return Path(last)
    raise HarnessError("holds no adapter_config.json and no checkpoint", field="--target", value=str(path),
                       fix="give a directory written by save_pretrained or a run's checkpoints/step-N folder")


def evaluate_only(cfg: HarnessConfig, target: str | Path | None, output_dir: str | Path, *,
                  progress: bool = True) -> Path:
    """``detox-harness eval``: evaluate the base model, an adapter or a checkpoint; write the run files.

    ``target=None`` evaluates the base model alone: "before" is the reference and "after" the same
    evaluation (a fresh LoRA adapter does not change the base, so evaluating it again would reproduce
    the same samples; ``timings.eval_after_s`` is 0). With a target, "before" is the reference (adapter
    off) and "after" the target, on the same prompts with the same seeds. Returns the run directory.
    """
    from .evaluation import evaluate_policy
    from .tiny import worlds_of

    t_start = time.time()
    run_dir = Path(output_dir)
    if rf.is_finished(run_dir) or (run_dir.is_dir() and _has_started(run_dir)):
        raise HarnessError("the run directory already holds a run", field="--output", value=str(run_dir),
                           fix="choose a new --output for the evaluation")
    cfg = copy.deepcopy(cfg)
    adapter = None
    if target is not None:
        if not cfg.policy.use_lora:
            raise HarnessError("a target adapter needs policy.use_lora=true", field="--target", value=str(target))
        adapter = resolve_target(target)
        cfg.policy.adapter = str(adapter)
        cfg.policy.reference = "base"  # "before" is the base model, "after" the target (not a copy of itself)
    from .judges import check_judges

    check_judges(cfg)
    inputs = load_inputs(cfg)
    policy, classifier, second, data = inputs.policy, inputs.classifier, inputs.second, inputs.data
    timings: dict[str, float] = {"load_s": inputs.seconds}
    before = evaluate_policy(policy, classifier, data.test, cfg, use_reference=True, second_classifier=second,
                             faithfulness_judge=inputs.faithfulness, progress=progress)
    if adapter is None:
        after = EvalOutput(metrics=copy.deepcopy(before.metrics), samples=copy.deepcopy(before.samples), seconds=0.0)
    else:
        after = evaluate_policy(policy, classifier, data.test, cfg, use_reference=False, second_classifier=second,
                                faithfulness_judge=inputs.faithfulness, progress=progress)
    timings["eval_before_s"] = before.seconds
    timings["eval_after_s"] = after.seconds
    timings["total_s"] = time.time() - t_start
    results, samples = rf.build_results(cfg, before, after, run_id=run_dir.name, training=None, timings=timings,
                                        device=str(inputs.device),
                                        extra={"data": data.stats, "worlds": worlds_of(cfg.locations()),
                                               "target": None if adapter is None else str(adapter)})
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / rf.CONFIG_FILE)
    rf.write_run_files(run_dir, results, samples)
    return run_dir


def summary_table(results: dict) -> str:
    """Before/after figures for the terminal; a figure that was not measured shows as ``-``."""
    m = results["metrics"]
    rows = []
    for key, label in (("toxicity_mean", "toxicity mean"), ("toxicity_std", "toxicity std"),
                       ("toxic_rate", "share toxic (>= threshold)"), ("reward_mean", "reward mean"),
                       ("faithfulness_mean", "faithfulness mean"), ("faithful_rate", "share faithful (>= threshold)"),
                       ("rougeL", "ROUGE-L"), ("empty_rate", "empty outputs"), ("length_mean", "length (tokens)"),
                       ("distinct_summary_rate", "distinct summaries (share)"),
                       ("kl_per_sequence_mean", "KL to reference (nats/seq)")):
        rows.append((label, _fmt(m["before"].get(key), ".4f"), _fmt(m["after"].get(key), ".4f")))
    c = m["comparison"]
    lines = [text_table(("metric", "before", "after"), rows)]
    confidence = round(100 * c.get("confidence", 0.95))
    lines.append(f"mean toxicity improvement: {_pct(c['mean_improvement'])} "
                 f"({confidence}% CI {_pct(c['mean_improvement_ci_low'])} .. {_pct(c['mean_improvement_ci_high'])}), "
                 f"std improvement: {_pct(c['std_improvement'])}")
    return "\n".join(lines)


def make_baseline(cfg: HarnessConfig, seeds: list[int], output: str | Path, *, force_regen: bool = False,
                  progress: bool = True, echo=print) -> tuple[Path, dict]:
    """``detox-harness baseline``: one run per seed (into ``output.dir``), then the baseline file of them.

    Refuses an existing ``output`` without ``force_regen`` before running anything.
    """
    from . import baselines

    output = Path(output)
    baselines.refuse_existing(output, force_regen)  # before any run
    runs = []
    for seed in seeds:
        seeded = copy.deepcopy(cfg)
        seeded.seed = seed
        seeded.output.run_id = None
        run_dir = Path(seeded.output.dir) / f"{default_run_id(seeded)}-baseline"
        echo(f"baseline: seed {seed} -> {run_dir}")
        outcome = run(seeded, output=run_dir, progress=progress, echo=echo)
        if outcome.interrupted:
            raise KeyboardInterrupt
        runs.append(outcome.results)
    data = baselines.build_baseline(runs)
    return baselines.write_baseline(output, data, force_regen=force_regen), data
