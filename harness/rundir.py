"""A run directory's rules: where a run goes, what a directory may hold before a command writes into it, and
what ``--resume`` may change.

A directory is written by one command at a time (:class:`harness.files.DirectoryLock`) and only when it holds
nothing a command would adopt, overwrite or delete by mistake: a new run or evaluation needs a new or empty
directory, ``--resume`` needs an unfinished run, a warm start needs a new or empty directory or its own
earlier work. Every refusal here happens before anything is written, so a refused command changes no file.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from . import results as rf
from .config import HarnessConfig
from .errors import EnvironmentFault, HarnessError, brief, first_line
from .files import LOCK_FILE, DirectoryLock, holder

#: what a run directory holds (besides the atomic writer's temporary files)
RUN_ENTRIES = frozenset({rf.CONFIG_FILE, rf.BEFORE_FILE, rf.BASE_FILE, rf.TRAIN_STATS_FILE, rf.CHECKPOINTS_DIR,
                         rf.CURVE_FILE, rf.SELECTED_DIR, rf.RESULTS_FILE, rf.SAMPLES_FILE, rf.LOG_FILE,
                         rf.MANIFEST_FILE, "index.html", LOCK_FILE})
#: settings ``--resume`` may change: they do not change what the finished run computes (``ppo.steps``
#: extends or shortens it: each step's data and seeds depend on the step alone)
RESUMABLE_KEYS = ("ppo.steps", "ppo.checkpoint_every", "output.report", "output.report_to", "eval.batch_size",
                  "reward.batch_size", "eval.faithfulness_batch_size")


def default_run_id(cfg: HarnessConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{cfg.preset}-s{cfg.seed}"


def run_dir_for(cfg: HarnessConfig, output: str | Path | None, resume: bool) -> Path:
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


def first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (``path`` itself, or a new parent of it)."""
    path = Path(os.path.abspath(path))
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def has_started(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in (rf.CHECKPOINTS_DIR, rf.TRAIN_STATS_FILE, rf.BEFORE_FILE))


def _entries(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise EnvironmentFault(f"cannot be listed ({first_line(e)})", field="--output", value=str(directory),
                               fix="fix its permissions or choose another directory") from e


def _not_ours(directory: Path, ours) -> list[str]:
    return [n for n in _entries(directory) if n not in ours and not (n.startswith(".") and n.endswith(".tmp"))]


def _listed(names: list[str]) -> str:
    shown = ", ".join(brief(n, 40) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def require_directory(path: Path, field: str = "--output") -> None:
    """``path`` is a directory or nothing yet, and no other command holds it (:class:`harness.files.DirectoryLock`):
    a second command on a directory is refused before it looks at what the first one is writing."""
    if path.exists() and not path.is_dir():
        raise EnvironmentFault("is a file, not a directory", field=field, value=str(path),
                               fix="give a directory path")
    who = holder(path)
    if who:
        raise HarnessError(f"another command is using this directory: {who}", field=field, value=str(path),
                           fix="wait for it to finish, or choose another directory")


def require_new_run(run_dir: Path, what: str = "run") -> None:
    """A new run or evaluation goes into a new or empty directory: never over a finished run, an unfinished one
    (that is ``--resume``'s), or files some other tool put there."""
    require_directory(run_dir)
    if rf.is_finished(run_dir):
        raise HarnessError("the directory already holds a finished run", field="--output", value=str(run_dir),
                           fix=f"choose a new --output for the {what} (or omit it for a fresh run id)")
    if has_started(run_dir):
        fix = "continue it with --resume, or choose a new --output" if what == "run" else \
            f"choose a new --output for the {what}"
        raise HarnessError("the directory holds an unfinished run", field="--output", value=str(run_dir), fix=fix)
    foreign = _not_ours(run_dir, {LOCK_FILE})
    if foreign:
        raise HarnessError(f"the directory holds files that are not a run of this harness ({_listed(foreign)})",
                           field="--output", value=str(run_dir), fix=f"choose a new or empty --output for the {what}")


def require_resumable(run_dir: Path) -> None:
    """``--resume`` continues an unfinished run: a directory with its config.yaml, no results.json, nothing else."""
    require_directory(run_dir)
    if not (run_dir / rf.CONFIG_FILE).is_file():
        raise HarnessError("holds no run to resume (no config.yaml)", field="--output", value=str(run_dir),
                           fix="give the directory of the interrupted run")
    if rf.is_finished(run_dir):
        raise HarnessError("the run is finished (it has its results.json); resuming would replace its results",
                           field="--resume", value=str(run_dir),
                           fix="start a new run with another --output (e.g. with more ppo.steps)")
    foreign = _not_ours(run_dir, RUN_ENTRIES)
    if foreign:
        raise HarnessError(f"the directory holds files that are not a run of this harness ({_listed(foreign)})",
                           field="--output", value=str(run_dir), fix="give the directory of the interrupted run")


def require_warm_start_dir(out: Path, own: set[str]) -> None:
    """A warm start writes a new or empty directory, or continues its own work there (``own``: the names of a
    warm start's files); never a run directory or another tool's files."""
    require_directory(out)
    names = _not_ours(out, {LOCK_FILE})
    if not names:
        return
    if rf.CONFIG_FILE in names or rf.RESULTS_FILE in names or rf.TRAIN_STATS_FILE in names:
        raise HarnessError("the directory holds a PPO run, not a warm start", field="--output", value=str(out),
                           fix="choose a new --output for the adapter")
    if not own & set(names):
        raise HarnessError(f"the directory holds files that are not a warm start of this harness "
                           f"({_listed(names)})", field="--output", value=str(out),
                           fix="choose a new or empty --output for the adapter")


def checkpoint_step(checkpoint) -> int | None:
    """The step of a ``checkpoints/step-NNNNNN`` folder (its name says it), or None."""
    if checkpoint is None:
        return None
    name = Path(checkpoint).name
    return int(name.split("-", 1)[1]) if name.startswith("step-") and name[5:].isdigit() else None


def resumed_config(run_dir: Path, overrides: list[str], echo) -> HarnessConfig:
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
    saved = bounds_from_preset(saved, data.get("thresholds"), overrides, echo)
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


def bounds_from_preset(cfg: HarnessConfig, saved_bounds, overrides: list[str], echo) -> HarnessConfig:
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


def resume_hint(cfg: HarnessConfig, run_dir: Path, last_checkpoint) -> str | None:
    """How to continue an interrupted run; None when nothing was done yet that a resume would keep."""
    if not has_started(run_dir):
        return None
    where = f"last checkpoint {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
    return f"{where}; continue with: detox-harness run --preset {cfg.preset} --output {run_dir} --resume"


class RunLog(logging.FileHandler):
    """``run.log``: the harness's warnings (and an unexpected traceback) while the run lasts. A line that cannot
    be written (a full disk) is dropped quietly, not reported with logging's own traceback on the terminal; the
    run's real fault, if any, is reported once by the CLI."""

    def __init__(self, run_dir: Path):
        super().__init__(run_dir / rf.LOG_FILE, encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def handleError(self, record):  # noqa: N802 (logging's name)
        self.failed = getattr(self, "failed", 0) + 1

    def __enter__(self) -> RunLog:
        logging.getLogger("harness").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("harness").removeHandler(self)
        self.close()


class Claim:
    """A directory a command owns while it lasts (:func:`claim`): made if missing, locked, checked again under the
    lock. ``abandon()`` removes what the claim created (bad input found while loading leaves no stub)."""

    #: what the directory is, in messages
    KINDS = {"run": "run directory", "eval": "run directory", "sft": "adapter directory"}

    def __init__(self, directory: Path, command: str, check):
        self.directory = Path(directory)
        self.created = first_missing(directory)
        self.lock = DirectoryLock(directory, command)
        self.check = check

    def __enter__(self) -> Claim:
        from .errors import environment_fault

        try:  # a path that cannot be written fails here, before minutes of loading
            self.directory.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
        except OSError as e:
            self.abandon()
            raise environment_fault(e, f"creating the {self.KINDS.get(self.lock.command, 'directory')} "
                                       f"{self.directory}") from e
        except HarnessError:
            self.abandon()
            raise
        try:
            self.check(self.directory)  # again, under the lock: another command may have written it meanwhile
        except BaseException:
            self.abandon()
            raise
        if self.lock.taken_over:
            logging.getLogger(__name__).warning("%s: took over the lock left by %s, which is no longer running",
                                                self.directory, self.lock.taken_over)
        return self

    def release(self) -> None:
        self.lock.release()

    def abandon(self) -> None:
        self.release()
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            self.created = None

    def __exit__(self, *exc) -> None:
        self.release()
