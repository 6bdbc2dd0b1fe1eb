"""``detox-harness``: run | sft | baseline | calibrate | eval | report | build-tiny | presets.

Exit codes (the README's table): 0 every bound holds, 1 a bound failed (or a metric left its baseline),
2 bad input or environment (settings, data, models, paths, permissions, a full disk: a one-line message
naming the field and the fix, no traceback), 3 training failed (e.g. too many non-finite steps; the last
good weights are saved), 4 an unexpected exception (a bug: one line, the traceback in a log file),
130 interrupted (a checkpoint is saved).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import (
    EXIT_BOUND_FAILED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_PASS,
    HarnessError,
    TrainingError,
    UnexpectedError,
    brief,
    disk_full_error,
    environment_fault,
    first_line,
)

EPILOG = """examples:
  detox-harness run --preset tiny                      # the whole job on the offline tiny world
  detox-harness run --preset tiny --sft                # the recipe: SFT warm start, then PPO from it
  detox-harness sft --preset tiny --output adapters/sft  # the warm start alone (then policy.adapter=...)
  detox-harness run --preset flan-t5-base ppo.steps=20 policy.model=/models/flan-t5-base
  detox-harness run --preset tiny --output reports/my-run --resume
  detox-harness run --preset tiny --num-processes 2     # data-parallel, through accelerate's launcher
  accelerate launch --num_processes 4 -m harness.cli run --preset flan-t5-large   # the same, launched by hand
  detox-harness eval --preset tiny --target reports/<run>/checkpoints/step-000030
  detox-harness report reports/<run>
  detox-harness baseline --preset tiny --seeds 0,1,2,3,4    # writes baselines/tiny.json
  detox-harness run --preset tiny --baseline baselines/tiny.json
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="tiny (default), flan-t5-base, flan-t5-small, flan-t5-large")
    p.add_argument("--config", help="a YAML file of settings applied on top of the preset")
    p.add_argument("--seed", type=int, help="run seed (overrides the config's seed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="do not render the HTML report")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="settings, e.g. ppo.batch_size=32 policy.model=/path thresholds.max_kl=10")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("detox-harness")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detox-harness", description="Make a seq2seq summarizer less toxic "
                                     "with PPO, and prove it.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="evaluate before, train with PPO, evaluate after, verdict, report")
    _add_config_args(run)
    run.add_argument("--output", help="run directory (default: <output.dir>/<time>-<preset>-s<seed>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    run.add_argument("--baseline", metavar="FILE", help="also fail when a metric leaves this baseline's tolerance "
                     "(e.g. baselines/tiny.json)")
    run.add_argument("--sft", action="store_true", help="the whole recipe: a supervised warm start (made, or reused "
                     "from the cache when made with the same settings), then PPO from it")
    run.add_argument("--accept-loosened-bounds", action="store_true",
                     help="bounds loosened against the preset's (thresholds.NAME=VALUE, --config) do not fail the run "
                          "by themselves; the verdict then reads 'PASS with loosened bounds', never PASS")
    run.add_argument("--no-cache", action="store_true", help="evaluate 'before' again, even where a run with the same "
                     "reference, prompts, judges and evaluation settings left it in the cache")
    run.add_argument("--num-processes", type=int, default=1, metavar="N",
                     help="data-parallel over N processes on this machine, started by accelerate's launcher (one "
                          "per GPU, or N CPU processes); the same numbers as one process (docs/scale.md)")

    sft = sub.add_parser("sft", help="supervised warm start: LoRA fine-tuning on (prompt -> summary), an adapter "
                         "for policy.adapter")
    _add_config_args(sft)
    sft.add_argument("--output", help="adapter directory (default: the cache, where run --sft finds it); an "
                     "unfinished one is resumed")

    base = sub.add_parser("baseline", help="run several seeds and write their metrics as a baseline file")
    _add_config_args(base)
    base.add_argument("--seeds", default="0,1,2,3,4",
                      help="comma-separated run seeds (default 0,1,2,3,4; at least 3: the tolerances are t prediction "
                           "intervals, and fewer seeds give bands too wide to guard anything)")
    base.add_argument("--output", help="baseline file (default: baselines/<preset>.json)")
    base.add_argument("--force-regen", action="store_true", help="rewrite an existing baseline file")
    base.add_argument("--from-runs", metavar="DIR", nargs="+", help="make the baseline of these finished run "
                      "directories instead of running the seeds (e.g. after a change of the tolerance rule)")

    ev = sub.add_parser("eval", help="evaluate a base model, an adapter directory or a checkpoint")
    _add_config_args(ev)
    ev.add_argument("--target", help="adapter or checkpoint directory (default: the base model itself)")
    ev.add_argument("--output", help="run directory for results.json / samples.jsonl")

    cal = sub.add_parser("calibrate", help="propose each bound's limit from a baseline's honest seeds, and show which "
                         "planted regression a moved limit would let through (docs/verdicts.md)")
    cal.add_argument("--preset", default="tiny", help="whose bounds (thresholds.toml) to check (default tiny)")
    cal.add_argument("--baseline", metavar="FILE", help="the honest seeds (default: baselines/<preset>.json)")
    cal.add_argument("--planted", metavar="FILE", help="planted runs' metrics, e.g. bench/results/planted-tiny.json "
                     "(written by bench/false_alarms.py)")
    cal.add_argument("--toml", action="store_true", help="also print the proposals as a thresholds.toml table")

    cur = sub.add_parser("curve", help="the over-optimisation curve of a finished run from its saved checkpoints "
                         "(curve.jsonl, selected/, the report again)")
    cur.add_argument("run_dir", help="a finished run directory holding checkpoints/")
    cur.add_argument("overrides", nargs="*", metavar="section.key=value",
                     help="eval.curve_every, eval.curve_prompts and batch sizes, e.g. eval.curve_every=10")

    rep = sub.add_parser("report", help="re-render the HTML report of a run directory")
    rep.add_argument("run_dir", help="a run directory holding results.json")

    tiny = sub.add_parser("build-tiny", help="show the offline tiny world (seed 0 is committed), or build one")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--force", action="store_true", help="rebuild into the cache even if committed or cached (the "
                      "committed world stays what tiny:// reads; compare digests with the printed one)")

    sub.add_parser("presets", help="list the presets and their bounds")

    ver = sub.add_parser("verify", help="check a run's files against its manifest.json (exit 0: as written; 1: a "
                         "file changed or is missing; 2: no manifest)")
    ver.add_argument("run_dir", help="a run directory holding manifest.json")

    init = sub.add_parser("init", help="write a starter project: a config, a pytest suite judged by the plugin (one "
                          "test per preset and seed), pytest.ini and a CI snippet")
    init.add_argument("directory", help="the project directory (made if needed; existing files are never overwritten)")
    init.add_argument("--presets", default="tiny", help="comma-separated presets of the suite (default tiny)")
    init.add_argument("--seeds", default="0", help="comma-separated seeds of the suite (default 0)")
    return parser


def _request(args):
    """The command line's settings, once: the preset, the YAML file, ``key=value`` overrides, ``--seed`` and
    ``--no-report`` (as overrides, so that a resumed run gets them the same way)."""
    from .plan import Request

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if getattr(args, "no_report", False):
        overrides.append("output.report=false")
    return Request(args.preset, args.config, tuple(overrides))


def launch_argv(argv: list[str], num_processes: int, port: int) -> list[str]:
    """``accelerate launch`` arguments that run ``detox-harness`` with ``argv`` (``--num-processes`` dropped) in
    ``num_processes`` processes on this machine. ``--multi_gpu`` is accelerate's multi-process mode: one
    process per GPU with CUDA, gloo CPU processes without (the config's ``device=cpu`` keeps them on the CPU)."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            rest.append(a)
    return ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "harness.cli", *rest]


def _check_shares(cfg, num_processes: int) -> None:
    """The batch sizes every process must get an equal share of (what each process checks after loading)."""
    from .parallel import check_divides

    for name in ("batch_size", "mini_batch_size"):
        check_divides(getattr(cfg.ppo, name), f"ppo.{name}", num_processes)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], num_processes: int) -> int:
    """Start the run in ``num_processes`` processes through accelerate's launcher; the processes' exit code."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(launch_argv(argv, num_processes, _free_port()))
    _quiet_elastic()
    try:
        launch_command(args)
    except ChildFailedError as e:  # a process exited non-zero: pass on its exit code (1 a bound, 2 bad input...)
        _rank, failure = e.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else EXIT_INTERNAL
    except SystemExit as e:
        # the launcher itself was stopped (SIGTERM, SIGINT): torch's agent passed the signal on to the processes
        # (the main one finishes its step, saves a checkpoint and says so) and accelerate exits 128 + signal;
        # the harness's code for an interruption is 130, whichever the signal
        import signal

        code = e.code if isinstance(e.code, int) else EXIT_INTERNAL
        return EXIT_INTERRUPTED if code in (128 + signal.SIGTERM, 128 + signal.SIGINT) else code
    return EXIT_PASS


def _quiet_elastic() -> None:
    """torchrun logs a failed process at ERROR, also for exit 1 (a bound failed), and a stop signal at WARNING
    ("Received 15 death signal"): the processes speak for themselves. Its loggers carry their own levels, so each
    is set, once torch.distributed.run has made them."""
    import torch.distributed.run  # noqa: F401  (imports the agent and launcher modules, whose loggers these are)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def cmd_run(args) -> int:
    from .jobs.run import run
    from .parallel import launched_as_main, launched_world_size
    from .plan import plan_run, silent
    from .report.text import summary_table
    from .thresholds import format_table

    if args.num_processes < 1:
        raise HarnessError(f"got {args.num_processes}, accepted: an integer >= 1", field="--num-processes")
    if args.sft and max(args.num_processes, launched_world_size()) > 1:
        raise HarnessError("the warm start runs in one process", field="--sft",
                           fix="make it first (detox-harness sft --preset P --output DIR), then run the processes "
                               "with policy.adapter=DIR")
    if args.resume and args.config:
        raise HarnessError("--resume continues a run with its saved config", field="--config",
                           fix="drop --config (settings that may change on resume can be given as key=value)")

    def planned(echo=print):
        return plan_run(_request(args), output=args.output, resume=args.resume, sft=args.sft, baseline=args.baseline,
                        accept_loosened=args.accept_loosened_bounds, cache=not args.no_cache, echo=echo)

    if args.num_processes > 1 and launched_world_size() == 1:
        # what the plan refuses (a resumed run's saved config included) and the batch sizes the processes cannot
        # share are said here, once, not by each process after loading; the processes' main one says the warnings
        _check_shares(planned(silent).cfg, args.num_processes)
        return launch(args.argv, args.num_processes)

    plan = planned()
    outcome = run(plan, progress=not args.no_progress)
    if outcome.interrupted or not launched_as_main():  # the main process prints
        return outcome.exit_code
    print()
    print(summary_table(outcome.results))
    print()
    print(format_table(outcome.verdict if outcome.verdict is not None else outcome.bounds))
    failed = [b.name for b in outcome.bounds if not b.passed]
    if failed:
        print(f"failed bounds: {', '.join(failed)}")
    if args.baseline:
        from .baselines import format_checks

        print()
        print(format_checks(outcome.baseline_checks, args.baseline))
    _print_files(outcome.run_dir, outcome.report)
    return outcome.exit_code


def _print_files(run_dir: Path, report: Path | None) -> None:
    """Where a run's files went (the README's promise): results, samples, PPO statistics, the pages."""
    from . import results as rf

    print()
    for label, name in (("results", rf.RESULTS_FILE), ("samples", rf.SAMPLES_FILE), ("stats", rf.TRAIN_STATS_FILE)):
        if (run_dir / name).is_file():
            print(f"{label + ':':9}{run_dir / name}")
    if report:
        print(f"{'report:':9}{report}")
        print(f"{'history:':9}{report.parent.parent / report.name}")


def cmd_sft(args) -> int:
    from .jobs.warm_start import sft_metrics, warm_start
    from .plan import plan_sft
    from .thresholds import SFT_BOUNDS, all_passed, format_table, verdict

    plan = plan_sft(_request(args), args.output)
    adapter, saved = warm_start(plan, progress=not args.no_progress)
    bounds = verdict({"metrics": {"sft": sft_metrics(saved)}},
                     {k: v for k, v in plan.cfg.thresholds.items() if k in SFT_BOUNDS})
    if bounds:
        print()
        print(format_table(bounds))
    print(f"\nadapter: {adapter}\nuse it:  detox-harness run --preset {plan.cfg.preset} policy.adapter={adapter}")
    return EXIT_PASS if all_passed(bounds) else EXIT_BOUND_FAILED


def cmd_eval(args) -> int:
    from . import results as rf
    from .jobs.evaluate import evaluate
    from .plan import plan_eval
    from .report.text import summary_table

    run_dir, page = evaluate(plan_eval(_request(args), args.target, args.output), progress=not args.no_progress)
    print()
    print(summary_table(rf.load_results(run_dir)))
    _print_files(run_dir, page)
    return EXIT_PASS


def _seeds(text: str) -> list[int]:
    from .baselines import MIN_SEEDS
    from .config import SEED_MAX

    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if len(seeds) < MIN_SEEDS or len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) > SEED_MAX:
        raise HarnessError(f"got {brief(text)}, accepted: {MIN_SEEDS} or more distinct integers in [0, {SEED_MAX}], "
                           "comma-separated", field="--seeds", fix="e.g. --seeds 0,1,2,3,4")
    return seeds


def baseline_output(given: str | None, preset: str) -> Path:
    """The baseline file ``baseline`` writes: ``--output``, whose last part must be a plain file name (not ``.``,
    ``..`` or empty, no separator or control character) and not a directory, or ``baselines/<preset>.json`` of a
    known preset. Refused before anything runs or is written."""
    import os

    from .config import name_problem, preset_names

    if preset not in preset_names():
        raise HarnessError("unknown preset", field="--preset", value=preset,
                           fix=f"choose one of {', '.join(preset_names())}")
    if given is None:
        return Path("baselines") / f"{preset}.json"
    name = os.path.basename(given)
    problem = name_problem(name)
    if problem:
        whose = "which" if name == given else f"whose file name {brief(name)}"
        raise HarnessError(f"got {brief(given)}, {whose} {problem}", field="--output",
                           fix="give the baseline file's path, e.g. baselines/mine.json")
    if Path(given).is_dir():
        raise HarnessError(f"got {brief(given)}, which is a directory", field="--output",
                           fix="give the baseline file's path, e.g. baselines/mine.json")
    return Path(given)


def cmd_baseline(args) -> int:
    from .thresholds import text_table

    output = baseline_output(args.output, args.preset)
    if args.from_runs:
        from . import baselines
        from .results import load_results

        baselines.refuse_existing(output, args.force_regen)
        if args.force_regen and output.exists():
            print(f"baseline: --force-regen: rewriting {output} from {len(args.from_runs)} runs")
        data = baselines.build_baseline([load_results(Path(d)) for d in args.from_runs])
        path = baselines.write_baseline(output, data, force_regen=args.force_regen)
        seeds = data["seeds"]
    else:
        from .jobs.baseline import make_baseline
        from .plan import plan_baseline

        seeds = _seeds(args.seeds)
        plan = plan_baseline(_request(args), seeds, output, force_regen=args.force_regen)
        path, data = make_baseline(plan, progress=not args.no_progress)
    print(f"\nbaseline of seeds {', '.join(map(str, seeds))}: {path}")
    print(text_table(("metric", "mean", "spread", "tolerance"),
                     [(name, f"{m['mean']:.4g}", f"{m['spread']:.3g}", f"{m['tolerance']:.3g}")
                      for name, m in data["metrics"].items()]))
    return EXIT_PASS


def cmd_calibrate(args) -> int:
    from .baselines import load_baseline
    from .calibration import format_proposals, propose, toml_section
    from .results import read_json
    from .thresholds import load_bounds

    bounds = load_bounds(args.preset)
    if not bounds:
        raise HarnessError("the preset has no bounds to calibrate", field="--preset", value=args.preset,
                           fix="detox-harness presets lists the presets and their bounds")
    baseline = load_baseline(args.baseline or Path("baselines") / f"{args.preset}.json")
    if baseline.get("preset") != args.preset:
        raise HarnessError(f"the baseline is of preset {baseline.get('preset')!r}", field="--baseline",
                           fix=f"give the baseline of {args.preset}")
    planted = None
    if args.planted:
        data = read_json(Path(args.planted))
        if not isinstance(data, dict) or not isinstance(data.get("cases"), dict):
            raise HarnessError("not a planted-runs file (no 'cases')", field="--planted", value=args.planted,
                               fix="write it with: python bench/false_alarms.py --planted-only")
        planted = {name: case["metrics"] for name, case in data["cases"].items()}
    proposals = propose(baseline, bounds, planted)
    print(f"calibration of preset {args.preset} from {len(baseline['seeds'])} honest seeds "
          f"({', '.join(map(str, baseline['seeds']))})" + (f" and {len(planted)} planted runs" if planted else ""))
    print(format_proposals(proposals, planted is not None))
    if args.toml:
        print("\n" + toml_section(args.preset, proposals))
    return EXIT_PASS


def cmd_curve(args) -> int:
    from .jobs.curve import make_curve
    from .plan import plan_curve
    from .report.formats import fmt_pct as percent
    from .thresholds import text_table

    rows, summary, page = make_curve(plan_curve(args.run_dir, args.overrides))
    print()
    print(text_table(("step", "KL", "reward model", "second judge", "quality"),
                     [(str(r["step"]), f"{r['kl']:.3f}", percent(r["improvement"]), percent(r["second_improvement"]),
                       ", ".join(r["quality_failed"]) or "ok") for r in rows]))
    selected = summary["selected"]
    print(f"peak of the second judge (mean of {summary['window']} points): steps {summary['peak_from_step']}-"
          f"{summary['peak_step']}; regret {percent(summary['judge_regret'])}; "
          f"selected: {'none' if selected is None else 'step ' + str(selected['step'])}"
          + (f" ({summary['adapter']}/)" if summary["adapter"] else ""))
    print(f"curve: {Path(args.run_dir) / 'curve.jsonl'}\nreport: {page}")
    return EXIT_PASS


def cmd_report(args) -> int:
    from .files import DirectoryLock
    from .report import render_index, render_run
    from .report.render import PAGE, require_own_page
    from .rundir import require_directory

    run_dir = Path(args.run_dir)
    require_directory(run_dir, "run_dir")
    for path in (run_dir / PAGE, run_dir.parent / PAGE):  # both checked before either is written
        require_own_page(path)
    with DirectoryLock(run_dir, "report", field="run_dir"):  # not while a run writes it
        page = render_run(run_dir)
        index = render_index(run_dir.parent)
    print(f"report: {page}\nindex:  {index}")
    return EXIT_PASS


def cmd_build_tiny(args) -> int:
    from . import tiny
    from .config import SEED_MAX
    from .results import read_json

    if not 0 <= args.seed <= SEED_MAX:
        raise HarnessError(f"got {brief(args.seed)}, accepted: an integer in [0, {SEED_MAX}]", field="--seed")
    path = tiny.build(seed=args.seed, force=args.force, verbose=True)
    manifest = read_json(path / tiny.MANIFEST)
    print(f"tiny world: {path} (built in {manifest['build_seconds']:.1f}s, classifier held-out accuracy "
          f"{manifest['classifier']['heldout_accuracy']:.3f}, digest {manifest.get('digest', 'unrecorded')})")
    committed = tiny.committed_dir(args.seed)
    if path != committed and tiny.is_built(committed):
        theirs = tiny.digest_of(committed)
        if manifest.get("digest") == theirs:
            print(f"the committed world ({committed}) is the same, byte for byte")
        else:
            print(f"the committed world ({committed}) differs (digest {theirs}): built on "
                  f"{read_json(committed / tiny.MANIFEST).get('built_on')}, here on {tiny.cpu_kind()}; tiny:// reads "
                  "the committed one")
    return EXIT_PASS


def cmd_verify(args) -> int:
    from .provenance import MANIFEST_FILE, verify_run

    problems = verify_run(args.run_dir)
    if problems:
        print(f"{args.run_dir}: {len(problems)} file(s) differ from {MANIFEST_FILE}:")
        for line in problems:
            print(f"  {line}")
        return EXIT_BOUND_FAILED
    print(f"{args.run_dir}: every file matches {MANIFEST_FILE}")
    return EXIT_PASS


def cmd_init(args) -> int:
    from .starter import write_starter

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise HarnessError(f"got {args.seeds!r}, accepted: distinct integers >= 0, comma-separated", field="--seeds",
                           fix="e.g. --seeds 0,1")
    written = write_starter(args.directory, presets, seeds)
    for path in written:
        print(f"wrote {path}")
    print(f"\nnext: cd {args.directory} && pytest   (the plugin comes with the package: pip install detox-harness)")
    return EXIT_PASS


def cmd_presets(args) -> int:
    from .config import load_config, preset_names

    for name in preset_names():
        cfg = load_config(name)
        bounds = ", ".join(f"{k}={v:g}" for k, v in cfg.thresholds.items()) or "none"
        print(f"{name}: policy {cfg.policy.model}, reward {cfg.reward.model}, data {cfg.data.path}\n  bounds: {bounds}")
    return EXIT_PASS


COMMANDS = {"run": cmd_run, "sft": cmd_sft, "baseline": cmd_baseline, "eval": cmd_eval, "report": cmd_report,
            "curve": cmd_curve,
            "calibrate": cmd_calibrate,
            "build-tiny": cmd_build_tiny, "presets": cmd_presets, "verify": cmd_verify, "init": cmd_init}


def _quiet_libraries(verbose: bool, progress: bool) -> None:
    """Keep the terminal for the harness's own output: no library deprecation notices users cannot act on
    (peft asks transformers a deprecated question on every LoRA load), and no weight-loading bar per model
    loaded (seven on a tiny run) unless -v. Hub downloads keep their bars unless progress bars are off: a
    first run fetches gigabytes."""
    import warnings

    if not verbose:
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if verbose and progress:
        return
    try:
        from huggingface_hub.utils import enable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - both are dependencies
        return
    hf_logging.disable_progress_bar()  # transformers' own bars ("Loading weights"), and the hub's with them
    if progress:
        enable_progress_bars()  # the hub's download bars back; transformers' stay off


def _interrupt_on_sigterm():
    """SIGTERM (a scheduler's stop, ``kill``) interrupts like Ctrl-C wherever the command is: it exits 130 with
    its one line, not 143 from the signal. (During PPO steps the trainer's own handler finishes the step and
    writes a checkpoint first.) Returns the previous handler, or None off the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    previous = _interrupt_on_sigterm()
    try:
        return _main(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries(verbose=args.verbose, progress=not getattr(args, "no_progress", False))
    try:
        _one_process_unless_run(args.command)
        return COMMANDS[args.command](args)
    except HarnessError as e:
        what = "training failed" if isinstance(e, TrainingError) else "error"
        print(f"detox-harness: {what}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        from .parallel import launched_as_main

        if launched_as_main():  # every process of a data-parallel run is stopped: the main one says so, once
            print("detox-harness: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # the machine refused: a path, a permission, a full disk (not the model's quality)
        fault = environment_fault(e, f"detox-harness {args.command}", _written_path(args))
        print(f"detox-harness: error: {fault}", file=sys.stderr)
        return fault.exit_code
    except Exception as e:  # a bug: one line here, the traceback in a log file
        cause, trace, hint = e, None, None
        if isinstance(e, UnexpectedError):  # a run's: its traceback is in run.log, and it may be resumed
            cause, trace, hint = e.cause, e.traceback_file, e.resume_hint
        if disk_full_error(cause) is not None:  # a library's own error about a write the disk refused: not a bug
            fault = environment_fault(cause, f"detox-harness {args.command}", _written_path(args))
            print(f"detox-harness: error: {fault}" + (f"; {hint}" if hint else ""), file=sys.stderr)
            return fault.exit_code
        trace = trace or _write_traceback(cause)
        print(f"detox-harness: internal error ({type(cause).__name__}: {first_line(cause)}); this is a bug, please "
              f"report it with the traceback in {trace}" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return EXIT_INTERNAL


def _written_path(args) -> str | None:
    """Where the command writes (its --output, or report's run directory), for an error that knows no file."""
    return getattr(args, "output", None) or getattr(args, "run_dir", None)


def _one_process_unless_run(command: str) -> None:
    """Only ``run`` is data-parallel; another command under a multi-process launcher would write its files once
    per process: refuse it."""
    from .parallel import launched_world_size

    if command != "run" and launched_world_size() > 1:
        raise HarnessError(f"detox-harness {command} runs in one process; only run is data-parallel",
                           field="accelerate launch", value=f"{launched_world_size()} processes",
                           fix=f"start detox-harness {command} without accelerate launch (or with --num_processes 1)")


def _write_traceback(exc: BaseException) -> str:
    """Write ``exc``'s traceback to a new file in the temporary directory and return its path."""
    import tempfile
    import traceback

    try:
        with tempfile.NamedTemporaryFile("w", prefix="detox-harness-error-", suffix=".log", delete=False) as f:
            f.write("".join(traceback.format_exception(exc)))
        return f.name
    except OSError:
        return "(nowhere: no file could be written; run again with -v)"


if __name__ == "__main__":
    sys.exit(main())
