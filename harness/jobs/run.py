"""``detox-harness run``: evaluate before, train with PPO, evaluate after, verdict, results files, report.

Each phase's output is written to the run directory as soon as it exists (the "before" evaluation, PPO
statistics after every step, checkpoints), so an interrupted run resumes without redoing finished work. File
names and formats: :mod:`harness.results`; what was decided before anything loads: :mod:`harness.plan`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .. import evalcache, provenance, rundir
from .. import results as rf
from ..errors import (
    EXIT_BOUND_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PASS,
    EnvironmentFault,
    HarnessError,
    UnexpectedError,
    environment_fault,
)
from ..metrics import PHASE_KEYS, EvalOutput, phase_metrics, training_summary
from ..plan import RunPlan, last_checkpoint, silent
from ..report.text import phase_line
from .inputs import RunInputs, load_inputs


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


def run(plan: RunPlan, *, progress: bool = True, echo=print) -> RunOutcome:
    """Execute a run plan (:func:`harness.plan.plan_run`); returns the outcome (results, bounds, exit code).

    With a warm start in the plan (``--sft``), it is made (or reused) first. The run directory is claimed (made,
    locked for the whole run, checked again under the lock); a directory this call created is removed again
    when the inputs fail to load (no stub is left). A file-system fault (a path that cannot be written, a full
    disk) raises an :class:`EnvironmentFault` that names the last checkpoint and the resume command; any other
    unexpected exception becomes an :class:`UnexpectedError` with its traceback written to the run's ``run.log``.

    Under ``accelerate launch`` with several processes the run is data-parallel (docs/scale.md): every process
    evaluates and trains on its share and gets the same numbers; the main process alone prints and writes.
    """
    parallel = plan.parallel
    if not parallel.is_main:  # the main process prints; the others' warnings would repeat its own
        echo = silent
        logging.getLogger("harness").setLevel(logging.ERROR)
    if plan.warm_start is not None:
        from .warm_start import warm_start

        warm_start(plan.warm_start, progress=progress, echo=echo)
    parallel.wait()  # every process has planned before the main process writes into the directory
    check = rundir.require_resumable if plan.resume else rundir.require_new_run
    owner = rundir.Claim(plan.run_dir, "run", check) if parallel.is_main else contextlib.nullcontext()
    with owner as claim:  # the main process owns the directory for the whole run; the others only read
        try:
            inputs = load_inputs(plan.loads, min_train_rows=plan.cfg.ppo.batch_size, device=parallel.device)
        except BaseException:
            if claim is not None:  # bad input leaves no stub directory behind, nor its new parents
                claim.abandon()
            raise
        if claim is None:
            return _run(plan, inputs, progress=False, echo=echo)
        with rundir.RunLog(plan.run_dir) as log:
            return _guarded(plan, inputs, log, progress=progress, echo=echo)


def _guarded(plan: RunPlan, inputs: RunInputs, log: rundir.RunLog, *, progress: bool, echo) -> RunOutcome:
    """The run, with its faults told as the CLI tells them: a file-system fault names how to resume; anything
    unexpected has its traceback in run.log."""
    cfg, run_dir = plan.cfg, plan.run_dir

    def hint() -> str | None:
        return rundir.resume_hint(cfg, run_dir, last_checkpoint(run_dir))

    try:
        return _run(plan, inputs, progress=progress, echo=echo)
    except EnvironmentFault as e:
        how = hint()
        raise EnvironmentFault(f"{e}; {how}" if how else str(e)) from e
    except HarnessError:
        raise
    except OSError as e:
        fault, how = environment_fault(e, "the run"), hint()
        raise EnvironmentFault(f"{fault}; {how}" if how else str(fault)) from e
    except Exception as e:
        written = None
        try:  # straight into the file: through logging, the terminal's handler would print it too
            with open(log.baseFilename, "a", encoding="utf-8") as f:
                f.write("the run failed with an unexpected exception:\n" + "".join(traceback.format_exception(e)))
            written = log.baseFilename
        except OSError:
            pass  # the CLI writes it to a temporary file instead
        raise UnexpectedError(e, written, hint()) from e


def _run(plan: RunPlan, inputs: RunInputs, *, progress: bool, echo) -> RunOutcome:
    from ..evaluation import evaluate_policy, select_prompts
    from ..models import count_parameters, format_parameter_count
    from ..ppo.trainer import PPOTrainer

    cfg, run_dir, parallel = plan.cfg, plan.run_dir, plan.parallel
    main = parallel.is_main
    t_start = time.time() - inputs.seconds
    if main:
        cfg.save(run_dir / rf.CONFIG_FILE)
    policy, classifier, data = inputs.policy, inputs.classifier, inputs.data
    timings: dict[str, float] = {"load_s": inputs.seconds}
    echo(f"run {run_dir.name}: preset {cfg.preset}, seed {cfg.seed}, device {inputs.device}"
         + (f", {parallel.world_size} processes" if parallel.distributed else ""))
    echo(format_parameter_count(count_parameters(policy)))
    echo(_data_line(data.stats))
    test = select_prompts(data.test, cfg.eval.num_samples)

    # "before" is where training starts: the starting adapter itself when the KL reference is the bare base
    # (policy.reference=base), evaluated before any step, so that its old effect is never counted as this run's
    start_is_reference = not (cfg.policy.adapter and cfg.policy.reference == "base")

    models = provenance.resolve_missing(plan.models)
    if plan.warm_start is not None:  # the warm start's adapter exists now
        models["adapter"] = provenance.revision_of(cfg.policy.adapter, plan.loads.policy.adapter)
    data_pin = {"fingerprint": provenance.rows_fingerprint([data.train, test]), "train_rows": len(data.train),
                "test_rows": len(test)}
    test_pin = provenance.rows_fingerprint([test])
    cache_use: dict[str, str] = {}

    def evaluated_once(name: str, *, bare: bool = False) -> EvalOutput:
        """The reference's (or the bare base model's) evaluation, saved in ``name``: a resumed run reuses it; so
        does a run whose reference and evaluation settings are a cached one's (harness.evalcache)."""
        path = run_dir / name
        which = "base" if bare else "before"
        if plan.resume and path.exists():
            echo(f"{which}: reused the saved evaluation")
            saved = EvalOutput.from_json(rf.read_json(path))
            if not set(PHASE_KEYS) <= set(saved.metrics):  # saved before a figure existed: summarize its rows again
                saved.metrics = phase_metrics(saved.samples, cfg)
            return saved
        t_look = time.time()
        key = evalcache.before_key(cfg, models, test_pin, bare=bare)
        cached = evalcache.load(plan.before_cache, key)
        if cached is not None:
            cache_use[which] = "hit"
            echo(f"{which}: reused the cached evaluation {evalcache.key_digest(key)[:12]} (same reference, prompts, "
                 "judges and evaluation settings; --no-cache evaluates again)")
            if main:
                rf.write_json(path, cached.to_json(), indent=None)
            cached.seconds = time.time() - t_look  # the time this run spent on it
            return cached
        cache_use[which] = "miss" if plan.before_cache is not None else "off"
        out = evaluate_policy(policy, classifier, test, cfg, use_reference=bare or start_is_reference, base=bare,
                              second_classifier=inputs.second, faithfulness_judge=inputs.faithfulness,
                              progress=progress, parallel=parallel)
        if main:
            rf.write_json(path, out.to_json(), indent=None)
            evalcache.store(plan.before_cache, key, out)
        return out

    before = evaluated_once(rf.BEFORE_FILE)
    timings["eval_before_s"] = before.seconds
    echo(f"before: {phase_line(before.metrics)}")
    policies = None
    if cfg.policy.adapter:  # "before" is the starting adapter: the bare base model is evaluated too
        bare = evaluated_once(rf.BASE_FILE, bare=True)
        timings["eval_base_s"] = bare.seconds
        echo(f"base (adapters off): {phase_line(bare.metrics)}")
        from ..sft import read_result

        policies = {"base": bare.metrics,
                    "start": {"adapter": str(cfg.policy.adapter), "sft": read_result(Path(plan.loads.policy.adapter))}}

    t = time.time()
    trainer = PPOTrainer(cfg, policy, classifier, data.train, run_dir, parallel=parallel)
    if plan.resume:
        ckpt = trainer.resume()
        echo(f"resumed from {ckpt} (step {trainer.step})" if ckpt else "no checkpoint found: training from step 0")
    elif main and trainer.stats_path.exists():
        trainer.stats_path.unlink()
    from ..curve import Curve

    curve = Curve(cfg, run_dir, policy, classifier, test, second=inputs.second, faithfulness=inputs.faithfulness,
                  parallel=parallel, echo=echo)
    if curve.enabled:  # the points past the resumed checkpoint are dropped (made again), then step 0 if missing
        curve.start(trainer.step if plan.resume else None)
        if trainer.step == 0:
            curve.maybe_point(0, cfg.ppo.steps)
    result = trainer.train(progress=progress, after_step=curve.maybe_point if curve.enabled else None)
    timings["train_s"] = time.time() - t - curve.seconds
    if curve.enabled:
        timings["curve_s"] = curve.seconds
    stats = rf.read_jsonl(trainer.stats_path, missing_ok=True)
    if result.interrupted:
        echo(f"interrupted after step {result.steps_done}; checkpoint {result.checkpoint}. "
             f"Continue with: detox-harness run --preset {cfg.preset} --output {run_dir} --resume")
        return RunOutcome(run_dir=run_dir, results={}, interrupted=True)

    after = evaluate_policy(policy, classifier, test, cfg, use_reference=False, second_classifier=inputs.second,
                            faithfulness_judge=inputs.faithfulness, progress=progress, parallel=parallel)
    timings["eval_after_s"] = after.seconds
    timings["total_s"] = time.time() - t_start
    extra = {"data": data.stats, "parameters": count_parameters(policy), "checkpoint": result.checkpoint,
             "processes": parallel.world_size, "worlds": plan.worlds,
             "provenance": {"models": models, "data": data_pin, "before_cache": cache_use or {"before": "resumed"}}}
    if policies is not None:
        extra["policies"] = policies
    return _finish(plan, before, after, stats, timings, extra, str(inputs.device), main=main,
                   curve=curve.summary(result.steps_done))


def _data_line(stats: dict) -> str:
    removed = stats.get("test_overlap_removed")
    return (f"data: {stats['kept']} dialogues kept of {stats['dialogues']} ({stats['train']} train / "
            f"{stats['test']} test prompts, {stats['truncated_prompts']} truncated to {stats['max_prompt_tokens']} "
            "tokens" + (f"; {removed} test prompts removed: their dialogue is a training dialogue (case, white space "
                        "and punctuation aside)" if removed else "") + ")")


def _finish(plan: RunPlan, before, after, stats, timings, extra, device: str, *, main: bool,
            curve: dict | None = None) -> RunOutcome:
    """The one assembly of the run's results (metrics, verdict, baseline), the one write, the one render.
    ``curve``: ``metrics.curve`` (harness/curve.py), None without a curve."""
    from .. import baselines
    from ..thresholds import judge, load_bounds, load_evidence

    cfg, run_dir = plan.cfg, plan.run_dir
    results, samples = rf.build_results(cfg, before, after, run_id=run_dir.name, training=training_summary(stats),
                                        timings=timings, device=device, extra=extra)
    policies = extra.get("policies")
    if policies is not None and policies["start"]["sft"]:
        from .warm_start import sft_metrics

        results["metrics"]["sft"] = sft_metrics(policies["start"]["sft"])
    if curve is not None:
        results["metrics"]["curve"] = curve
        results["files"]["curve"] = rf.CURVE_FILE
    judged = judge(results, cfg.thresholds, load_bounds(cfg.preset), evidence=load_evidence(cfg.preset),
                   accept_loosened=plan.accept_loosened)
    results["verdict"] = judged.to_dict()
    checks = []
    if plan.baseline is not None:
        checks = baselines.compare(results, plan.baseline, baseline_name=plan.baseline_file)
        results["baseline"] = {"file": plan.baseline_file, "passed": all(c.passed for c in checks),
                               "seeds": plan.baseline["seeds"], "checks": [c.to_dict() for c in checks]}
    outcome = RunOutcome(run_dir=run_dir, results=results, bounds=judged.bounds,
                         passed=judged.passed and all(c.passed for c in checks), baseline_checks=checks,
                         verdict=judged)
    if main:
        rf.write_run_files(run_dir, results, samples)
        provenance.write_manifest(run_dir)  # after the files it pins
        if cfg.output.report:
            from ..report import render_index, render_run

            outcome.report = render_run(run_dir)
            render_index(run_dir.parent)
        if cfg.output.report_to:
            from ..trackers import export_run

            export_run(run_dir, results, stats, cfg.output.report_to, report=outcome.report)
    return outcome
