"""Plan first, then run: everything a command decides, decided once, before any model loads.

A :class:`RunPlan` holds the final config (preset, YAML file and overrides, or a resumed run's saved config
plus the settings a resume may change), the run directory and its fate (a new run or a resume; anything
else is refused here, before a file is written), the concrete locations to load (every ``tiny://`` id built
and replaced by its directory here and nowhere else; ``config.yaml`` and ``results.json`` keep the ids),
the starting adapter (``--sft``: the warm start's directory), the checked baseline and the process setup.
The jobs (:mod:`harness.jobs`) only execute a plan.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import provenance, rundir
from . import results as rf
from .config import HarnessConfig, load_config
from .errors import HarnessError
from .parallel import SINGLE, Parallel, launched_as_main

#: the config fields that name a model, an adapter or data: where ``tiny://`` ids may stand
LOCATION_FIELDS = (("data", "path"), ("policy", "model"), ("policy", "adapter"), ("reward", "model"),
                   ("eval", "second_classifier"), ("eval", "faithfulness_model"))


@dataclass(frozen=True)
class Request:
    """What a command line asks for: a preset, an optional YAML file, ``section.key=value`` overrides."""

    preset: str = "tiny"
    config_file: str | None = None
    overrides: tuple[str, ...] = ()

    def config(self) -> HarnessConfig:
        return load_config(self.preset, self.config_file, list(self.overrides))


@dataclass(frozen=True)
class RunPlan:
    command: str  # run | eval | sft | baseline | curve
    cfg: HarnessConfig  # the final config: what config.yaml and results.json record (tiny:// ids kept)
    loads: HarnessConfig  # the same with every tiny:// id replaced by its directory: what the job loads
    run_dir: Path | None = None  # run / eval: the run directory; sft: the adapter directory
    resume: bool = False
    warm_start: RunPlan | None = None  # run --sft: the warm start to make (or reuse) before PPO
    target: Path | None = None  # eval: the adapter or checkpoint evaluated (None: the base model)
    baseline: dict | None = None  # the checked baseline (--baseline), and its file
    baseline_file: str | None = None
    seeds: tuple[int, ...] = ()  # baseline: the seeds to run, and the file to write
    output: Path | None = None
    force_regen: bool = False
    accept_loosened: bool = False
    parallel: Parallel = field(default=SINGLE, compare=False)
    worlds: dict = field(default_factory=dict)  # {seed: digest} of the tiny worlds the config reads
    models: dict = field(default_factory=dict)  # the revision of each model (harness.provenance), resolved once
    before_cache: Path | None = None  # run: where the "before" evaluation is cached (harness.evalcache); None: off


# ------------------------------------------------------------------------------------ locations

def _build_tiny_worlds(cfg: HarnessConfig, echo) -> None:
    """A tiny world that is neither committed nor cached is built (about 10 minutes on 2 cores): say so."""
    from . import tiny

    for seed in tiny.seeds_of(cfg.locations() + [cfg.policy.adapter]):
        if not tiny.is_built(tiny.source_dir(seed)):
            echo(f"tiny world: not in the cache yet, building it into {tiny.world_dir(seed)} "
                 "(about 10 minutes on 2 cores, once; set DETOX_HARNESS_CACHE to move it)")
            tiny.build(seed=seed, verbose=True)


def concrete(cfg: HarnessConfig, echo=print) -> HarnessConfig:
    """``cfg`` with every ``tiny://`` location replaced by its directory (the world built first if needed): what
    the loaders read. The only place a ``tiny://`` id becomes a path."""
    from . import tiny

    _build_tiny_worlds(cfg, echo)
    out = copy.deepcopy(cfg)
    for section, name in LOCATION_FIELDS:
        value = getattr(getattr(out, section), name)
        if isinstance(value, str) and value.startswith("tiny://"):
            setattr(getattr(out, section), name, str(tiny.resolve(value)))
    return out


def before_cache_dir() -> Path:
    """``<cache>/before``: the cached "before" evaluations (``$DETOX_HARNESS_CACHE`` moves the cache)."""
    from .tiny import cache_root

    return cache_root() / "before"


def worlds(cfg: HarnessConfig) -> dict:
    from .tiny import worlds_of

    return worlds_of(cfg.locations())


# ------------------------------------------------------------------------------------ the warm start's place

def sft_settings(loads: HarnessConfig) -> dict:
    """Everything a warm-start adapter depends on (of the concrete config: a tiny world stands for its directory,
    whose name carries the builder's version): equal settings, equal adapter."""
    p = loads.policy
    return rf.jsonable({"policy": {"model": p.model, "adapter": p.adapter or None, "dtype": p.dtype,
                                   "lora_r": p.lora_r, "lora_alpha": p.lora_alpha,
                                   "lora_target_modules": list(p.lora_target_modules)},
                        "data": dict(loads.data.__dict__), "sft": dict(loads.sft.__dict__), "seed": loads.seed,
                        "device": loads.device})


def sft_cache_dir(loads: HarnessConfig) -> Path:
    """``<cache>/sft/<preset>-<hash of sft_settings>``: where ``run --sft`` keeps (and finds) its adapter."""
    from .tiny import cache_root

    digest = hashlib.sha256(json.dumps(sft_settings(loads), sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "sft" / f"{loads.preset}-{digest}"


# ------------------------------------------------------------------------------------ plans

def _config(request: Request | HarnessConfig) -> HarnessConfig:
    return copy.deepcopy(request) if isinstance(request, HarnessConfig) else request.config()


def _overrides(request: Request | HarnessConfig) -> list[str]:
    return list(request.overrides) if isinstance(request, Request) else []


def check_verdict_settings(cfg: HarnessConfig, loads: HarnessConfig, accept_loosened: bool, echo) -> None:
    """Labels and judges that cannot measure what the verdict claims are refused; what will keep the verdict from a
    plain PASS whatever the run measures is said now."""
    from .judges import check_judges
    from .thresholds import bound_change, load_bounds, load_evidence

    check_judges(loads)
    preset = load_bounds(cfg.preset)
    for name in sorted(set(preset) | set(cfg.thresholds)):
        change = bound_change(name, cfg.thresholds.get(name), preset.get(name))
        if change in ("loosened", "removed"):
            then = ("the verdict can at best read PASS with loosened bounds" if change == "loosened" and accept_loosened
                    else "the run fails")
            echo(f"warning: thresholds.{name} is {change} against preset {cfg.preset} "
                 f"({cfg.thresholds.get(name)} vs {preset.get(name)}): {then}")
    if cfg.eval.curve_every == 0 and "max_judge_regret" in cfg.thresholds:
        echo("warning: eval.curve_every=0 draws no curve, so max_judge_regret is not measured: the verdict will be "
             "FAIL (give eval.curve_every=N to draw it)")
    least = load_evidence(cfg.preset)
    for key, setting, value in (("min_num_samples", "eval.num_samples", cfg.eval.num_samples),
                                ("min_bootstrap_resamples", "eval.bootstrap_resamples", cfg.eval.bootstrap_resamples)):
        if key in least and value is not None and value < least[key]:
            echo(f"warning: {setting}={value} is below preset {cfg.preset}'s least evidence ({least[key]}): the "
                 "verdict will be FAIL (not enough evidence)")


def _require_report_pages(cfg: HarnessConfig, run_dir: Path) -> None:
    """The pages a run will write (its own and the history page beside it) must be absent or this package's."""
    if cfg.output.report:
        from .report.render import PAGE, require_own_page

        require_own_page(run_dir / PAGE)
        require_own_page(run_dir.parent / PAGE)


def last_checkpoint(run_dir: Path):
    """The run directory's newest complete checkpoint, or None."""
    from .ppo.checkpoints import latest_checkpoint

    return latest_checkpoint(run_dir / rf.CHECKPOINTS_DIR)


def plan_run(request: Request | HarnessConfig, *, output: str | Path | None = None, resume: bool = False,
             sft: bool = False, baseline: str | Path | None = None, accept_loosened: bool = False,
             cache: bool = True, echo=print) -> RunPlan:
    """The plan of ``detox-harness run``. ``resume``: continue ``output`` with its saved config; the request's
    overrides may change only :data:`harness.rundir.RESUMABLE_KEYS`. Without it, the directory must be new or
    empty. ``sft``: first the warm start (made, or reused when one was made with the same settings), then PPO
    from it. ``baseline``: a baseline file, checked against the run's config, worlds and judges' revisions now.
    ``cache``: reuse (and keep) the "before" evaluation in :func:`before_cache_dir` (:mod:`harness.evalcache`)."""
    from . import baselines

    if not launched_as_main():
        echo = silent
    cfg = _config(request)
    base = baselines.load_baseline(baseline) if baseline is not None else None
    run_dir = rundir.run_dir_for(cfg, output, resume)
    if resume:
        if sft:
            raise HarnessError("a resumed run continues from the adapter its config.yaml names", field="--sft",
                               fix="drop --sft (or start a new run with it)")
        rundir.require_resumable(run_dir)
        cfg = rundir.resumed_config(run_dir, _overrides(request), echo)
        step = rundir.checkpoint_step(last_checkpoint(run_dir))
        if step is not None and step > cfg.ppo.steps:
            raise HarnessError(f"the run's last checkpoint is at step {step}, past ppo.steps = {cfg.ppo.steps}",
                               field="ppo.steps", fix=f"give ppo.steps={step} or more to finish it")
    else:
        rundir.require_new_run(run_dir)
    _require_report_pages(cfg, run_dir)
    if cfg.output.report_to:  # a tracker that is not installed is said now, not after the training
        from .trackers import require_trackers

        require_trackers(cfg.output.report_to)
    loads = concrete(cfg, echo)
    check_verdict_settings(cfg, loads, accept_loosened, echo)
    warm = None
    if sft:
        if cfg.policy.adapter:
            raise HarnessError("--sft makes the starting adapter itself", field="policy.adapter",
                               value=cfg.policy.adapter, fix="drop policy.adapter, or drop --sft to start from it")
        warm = plan_sft(cfg, echo=echo)
        cfg.policy.adapter = str(warm.run_dir)
        loads.policy.adapter = str(warm.run_dir)
    found = worlds(cfg)
    models = provenance.model_revisions(cfg, loads)
    if base is not None:
        baselines.require_same_config(rf.jsonable(cfg.to_dict()), base, str(baseline))
        baselines.require_same_world(found, base, str(baseline))
        provenance.require_same_judges(models, base, str(baseline))
    parallel = Parallel.from_environment(cfg.device)
    parallel.check_divides(cfg.ppo.batch_size, "ppo.batch_size")  # before minutes of loading and evaluating
    parallel.check_divides(cfg.ppo.mini_batch_size, "ppo.mini_batch_size")
    return RunPlan("run", cfg, loads, run_dir=run_dir, resume=resume, warm_start=warm, baseline=base,
                   baseline_file=None if baseline is None else str(baseline), accept_loosened=accept_loosened,
                   parallel=parallel, worlds=found, models=models,
                   before_cache=before_cache_dir() if cache and parallel.world_size == 1 else None)


def plan_sft(request: Request | HarnessConfig, output: str | Path | None = None, *, echo=print) -> RunPlan:
    """The plan of ``detox-harness sft`` (and of ``run --sft``'s first part): the adapter directory is ``output``,
    or the cache's place for these settings (:func:`sft_cache_dir`)."""
    from .sft import OWN_FILES

    cfg = _config(request)
    if not cfg.policy.use_lora:
        raise HarnessError("the warm start trains a LoRA adapter", field="policy.use_lora",
                           fix="set policy.use_lora=true")
    loads = concrete(cfg, echo)
    out = Path(output) if output else sft_cache_dir(loads)
    rundir.require_warm_start_dir(out, OWN_FILES)
    return RunPlan("sft", cfg, loads, run_dir=out, worlds=worlds(cfg))


def plan_eval(request: Request | HarnessConfig, target: str | Path | None, output: str | Path | None = None, *,
              echo=print) -> RunPlan:
    """The plan of ``detox-harness eval``: the base model alone (``target=None``), or the adapter or checkpoint
    ``target`` names (a run directory means its latest checkpoint) against the base."""
    cfg = _config(request)
    run_dir = Path(output) if output else Path(cfg.output.dir) / f"{rundir.default_run_id(cfg)}-eval"
    rundir.require_new_run(run_dir, "evaluation")
    _require_report_pages(cfg, run_dir)
    adapter = None
    if target is not None:
        if not cfg.policy.use_lora:
            raise HarnessError("a target adapter needs policy.use_lora=true", field="--target", value=str(target))
        adapter = resolve_target(target)
        cfg.policy.adapter = str(adapter)
        cfg.policy.reference = "base"  # "before" is the base model, "after" the target (not a copy of itself)
    loads = concrete(cfg, echo)
    check_verdict_settings(cfg, loads, False, echo)
    return RunPlan("eval", cfg, loads, run_dir=run_dir, target=adapter, worlds=worlds(cfg),
                   models=provenance.model_revisions(cfg, loads))


def plan_baseline(request: Request | HarnessConfig, seeds, output: str | Path, *, force_regen: bool = False,
                  echo=print) -> RunPlan:
    """The plan of ``detox-harness baseline``: one run per seed, then the file. An existing file is refused
    without ``force_regen`` before anything runs."""
    from . import baselines

    output = Path(output)
    baselines.refuse_existing(output, force_regen)
    if force_regen and output.exists():
        echo(f"baseline: --force-regen: {output} will be rewritten with the new seeds' runs")
    cfg = _config(request)
    return RunPlan("baseline", cfg, concrete(cfg, echo), seeds=tuple(seeds), output=output, force_regen=force_regen,
                   worlds=worlds(cfg))


#: settings ``detox-harness curve`` may give besides the run's saved config: which points, and batch sizes
CURVE_KEYS = ("eval.curve_every", "eval.curve_prompts", "eval.batch_size", "reward.batch_size",
              "eval.faithfulness_batch_size", "device")


def plan_curve(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), *, echo=print) -> RunPlan:
    """The plan of ``detox-harness curve``: a finished run's saved config (its preset's bounds) with the
    ``overrides`` of :data:`CURVE_KEYS` (others are refused: they would change what the checkpoints are judged by)."""
    from .config import apply_overrides, changed_keys

    run_dir = Path(run_dir)
    rundir.require_directory(run_dir, "run_dir")
    if not rf.is_finished(run_dir):
        raise HarnessError("holds no finished run (no results.json)", field="run_dir", value=str(run_dir),
                           fix="give the directory of a finished run (an unfinished one makes its curve on --resume)")
    if last_checkpoint(run_dir) is None:
        raise HarnessError("holds no checkpoint to evaluate", field="run_dir", value=str(run_dir),
                           fix=f"give a run directory with {rf.CHECKPOINTS_DIR}/step-N folders")
    saved = rundir.resumed_config(run_dir, [], silent)
    cfg = apply_overrides(copy.deepcopy(saved), list(overrides))
    refused = [k for k in changed_keys(saved, cfg) if k not in CURVE_KEYS]
    if refused:
        raise HarnessError(f"the curve judges the run's checkpoints with its saved config; these settings would change "
                           f"it: {', '.join(refused)}", field="overrides",
                           fix=f"drop them (the curve may change only {', '.join(CURVE_KEYS)})")
    if cfg.eval.curve_every < 1:
        raise HarnessError("the curve needs points", field="eval.curve_every", value=cfg.eval.curve_every,
                           fix="give eval.curve_every=N (N >= 1): every checkpoint whose step is a multiple of N")
    from .report.render import PAGE, require_own_page

    require_own_page(run_dir / PAGE)  # the run's page is rendered again with its curve
    require_own_page(run_dir.parent / PAGE)
    return RunPlan("curve", cfg, concrete(cfg, echo), run_dir=run_dir, worlds=worlds(cfg))


def resolve_target(target: str | Path) -> Path:
    """An adapter or checkpoint directory; a run directory or a ``checkpoints`` folder means its latest checkpoint."""
    from .ppo.checkpoints import latest_checkpoint

    path = Path(target).expanduser()
    if not path.is_dir():
        raise HarnessError("is not a directory", field="--target", value=str(path),
                           fix="give an adapter or checkpoint directory (it holds adapter_config.json)")
    if (path / "adapter_config.json").is_file():
        return path
    for folder in (path / rf.CHECKPOINTS_DIR, path):
        last = latest_checkpoint(folder)
        if last is not None:
            return Path(last)
    raise HarnessError("holds no adapter_config.json and no checkpoint", field="--target", value=str(path),
                       fix="give a directory written by save_pretrained or a run's checkpoints/step-N folder")


def silent(*args, **kwargs) -> None:
    """``echo`` of the processes other than the main one."""
