"""detox-harness as a pytest plugin: a team's own repository judges its own policy in its own suites.

Installed with the package, it is a ``pytest11`` entry point (named ``harness.pytest_plugin``, the module's own
name, so that a ``conftest.py`` that also lists it in ``pytest_plugins`` loads it once); without the install,
``pytest -p harness.pytest_plugin``. docs/pytest-plugin.md has a worked example.

**Options** (each also an ini key where it says so, for the project's ``pytest.ini``):

- what to run: ``--detox-config FILE`` (ini ``detox_config``), ``--detox-presets tiny,flan-t5-base`` (ini
  ``detox_presets``), ``--detox-seeds 0,1`` (ini ``detox_seeds``), ``--detox-overrides "k=v ..."``,
  ``--detox-no-cache`` (evaluate "before" again instead of reusing the cached one);
- the models and data (as the GPU suite's): ``--policy-model``, ``--policy-adapter``, ``--reward-model``,
  ``--second-classifier``, ``--faithfulness-model``, ``--data-path`` (or ``$DETOX_POLICY_MODEL`` ...);
- ``--baseline FILE``, ``--report-dir DIR`` (default: a temporary directory), ``--run-gpu``: tests marked
  ``gpu`` are skipped without it, and *fail* with it on a machine without CUDA (a nightly job never passes by
  skipping everything);
- this repository's GPU suite: ``--gpu-presets``, ``--gpu-seeds``, ``--gpu-overrides``, ``--gpu-sft``.

**Fixtures**: ``detox_run`` (session) runs a harness run for (preset, seed, extra overrides) once per pytest
session, and gives a :class:`HarnessRun` (results, verdict, samples, report page); ``detox_eval`` (session)
evaluates an adapter (or the base model) the same way; ``detox_case`` is a :class:`Case` (preset, seed), one
test per preset and seed of the options.

**Assertions**: :func:`assert_passed` and :func:`assert_bound` fail with the verdict's table (bound, limit,
measured), so a failing test reads like ``detox-harness run``'s output.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

GPU_SKIP_REASON = "needs --run-gpu (and a CUDA device)"
NO_CUDA_MESSAGE = ("--run-gpu was given but no CUDA device is available (torch.cuda.is_available() is False): "
                   "run the GPU suite on a machine with an NVIDIA GPU and a CUDA build of torch, or drop --run-gpu")

#: (option, config key, environment variable): the models and data a suite points at its own copies
LOCATION_OPTIONS = (("--policy-model", "policy.model", "DETOX_POLICY_MODEL"),
                    ("--policy-adapter", "policy.adapter", "DETOX_POLICY_ADAPTER"),
                    ("--reward-model", "reward.model", "DETOX_REWARD_MODEL"),
                    ("--second-classifier", "eval.second_classifier", "DETOX_SECOND_CLASSIFIER"),
                    ("--faithfulness-model", "eval.faithfulness_model", "DETOX_FAITHFULNESS_MODEL"),
                    ("--data-path", "data.path", "DETOX_DATA_PATH"))
HELP = {"--policy-model": "local directory (or hub id) replacing the preset's policy model",
        "--policy-adapter": "LoRA adapter directory to start from",
        "--reward-model": "local directory (or hub id) replacing the preset's reward classifier",
        "--second-classifier": "local directory (or hub id) replacing the preset's second judge, unitary/toxic-bert",
        "--faithfulness-model": "local directory (or hub id) replacing the preset's faithfulness judge, "
                                "FacebookAI/roberta-large-mnli",
        "--data-path": "local DialogSum file/directory (or hub id) replacing the preset's data"}


def pytest_addoption(parser):
    parser.addoption("--run-gpu", action="store_true", default=False,
                     help="run tests marked gpu (real models on CUDA); fails if no CUDA device is available")
    parser.addoption("--baseline", action="store", default=None, metavar="FILE",
                     help="baseline file the suites compare their runs with (default for the tiny suite: the "
                          "committed baselines/tiny.json; the GPU suite compares only when this is given)")
    parser.addoption("--report-dir", action="store", default=None,
                     help="where suites that run the harness write their run folders and HTML reports "
                          "(default: a temporary directory for the CPU suites, reports/pytest-gpu/ for the GPU "
                          "suite; never beside a user's own runs in reports/)")
    group = parser.getgroup("detox-harness", "detox-harness: what the run fixtures run (harness.pytest_plugin)")
    group.addoption("--detox-config", default=None, metavar="FILE",
                    help="YAML settings applied on top of the preset (ini: detox_config)")
    group.addoption("--detox-presets", default=None, help="comma-separated presets of the detox_case tests "
                    "(ini: detox_presets; default tiny)")
    group.addoption("--detox-seeds", default=None, help="comma-separated seeds of the detox_case tests "
                    "(ini: detox_seeds; default 0)")
    group.addoption("--detox-overrides", default="", help="extra space-separated key=value settings for every run")
    group.addoption("--detox-no-cache", action="store_true", default=False,
                    help="evaluate 'before' again instead of reusing a cached evaluation of the same reference")
    for option, key, env in LOCATION_OPTIONS:
        group.addoption(option, default=os.environ.get(env), help=f"{HELP[option]} [${env}] ({key})")
    parser.addini("detox_config", "YAML settings file of the detox-harness runs (relative to the rootdir)",
                  default=None)
    parser.addini("detox_presets", "comma-separated presets of the detox_case tests", default="tiny")
    parser.addini("detox_seeds", "comma-separated seeds of the detox_case tests", default="0")
    gpu = parser.getgroup("detox-harness GPU suite")
    gpu.addoption("--gpu-presets", default="flan-t5-base",
                  help="comma-separated presets the GPU suite runs (e.g. tiny,flan-t5-base)")
    gpu.addoption("--gpu-seeds", default="0", help="comma-separated seeds the GPU suite runs")
    gpu.addoption("--gpu-overrides", default="", help="extra space-separated key=value overrides for GPU runs")
    gpu.addoption("--gpu-sft", action="store_true", default=False,
                  help="run the whole recipe (run --sft: the supervised warm start, then PPO from it) and assert "
                       "the preset's SFT bounds too (min_sft_rouge_l); the warm start is cached between sessions")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and real models; runs only with --run-gpu")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-gpu"):
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_setup(item):
    if "gpu" in item.keywords and item.config.getoption("--run-gpu"):
        import torch

        if not torch.cuda.is_available():
            pytest.fail(NO_CUDA_MESSAGE, pytrace=False)


# ------------------------------------------------------------------------------------ cases

@dataclass(frozen=True)
class Case:
    """One preset and seed of the suite (the ``detox_case`` fixture)."""

    preset: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.preset}-s{self.seed}"


def _listed(config, option: str, ini: str) -> list[str]:
    text = config.getoption(option) or config.getini(ini) or ""
    return [x.strip() for x in str(text).split(",") if x.strip()]


def cases(config) -> list[Case]:
    """Every (preset, seed) of ``--detox-presets`` x ``--detox-seeds`` (or the ini keys)."""
    seeds = []
    for text in _listed(config, "--detox-seeds", "detox_seeds"):
        if not text.isdigit():
            raise pytest.UsageError(f"--detox-seeds: {text!r} is not a seed; give integers >= 0 such as 0,1,2")
        seeds.append(int(text))
    return [Case(preset, seed) for preset in _listed(config, "--detox-presets", "detox_presets") for seed in seeds]


def pytest_generate_tests(metafunc):
    if "detox_case" in metafunc.fixturenames:
        metafunc.parametrize("detox_case", [pytest.param(c, id=c.id) for c in cases(metafunc.config)])


# ------------------------------------------------------------------------------------ settings

def location_overrides(config) -> list[str]:
    """``key=value`` settings of the model and data options that were given."""
    return [f"{key}={config.getoption(option)}" for option, key, _ in LOCATION_OPTIONS if config.getoption(option)]


def config_file(config) -> str | None:
    """``--detox-config``, else the ini's ``detox_config`` (relative to the rootdir); None for the preset alone."""
    given = config.getoption("--detox-config")
    if given:
        return str(Path(given).expanduser())
    ini = config.getini("detox_config")
    if ini:
        return str((Path(str(config.rootpath)) / str(ini)).resolve())
    return None


# ------------------------------------------------------------------------------------ runs

@dataclass
class HarnessRun:
    """A finished run (or evaluation) of the fixtures: its files, results and verdict."""

    run_dir: Path
    exit_code: int
    results: dict = field(default_factory=dict)
    verdict: object = None  # harness.thresholds.Verdict (None for an evaluation)
    report: Path | None = None
    baseline_checks: list = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None  # the one-line input error of a run that could not start (exit 2)

    @property
    def passed(self) -> bool:
        return self.error is None and self.exit_code == 0

    @property
    def samples(self) -> list[dict]:
        """The rows of ``samples.jsonl`` (read on first use)."""
        from .results import SAMPLES_FILE, read_jsonl

        if not hasattr(self, "_samples"):
            self._samples = read_jsonl(self.run_dir / SAMPLES_FILE)
        return self._samples

    def table(self) -> str:
        """The verdict's table as the CLI prints it (and the baseline's, when one was compared)."""
        from .thresholds import format_table

        if self.error is not None:
            return f"detox-harness: error: {self.error}"
        text = format_table(self.verdict) if self.verdict is not None else "(an evaluation: no verdict)"
        if self.baseline_checks:
            from .baselines import format_checks

            text += "\n\n" + format_checks(self.baseline_checks, "--baseline")
        return text


def _fail(run: HarnessRun, what: str) -> None:
    __tracebackhide__ = True
    pytest.fail(f"{what} (run {run.run_dir}, exit {run.exit_code})\n{run.table()}", pytrace=False)


def assert_passed(run: HarnessRun) -> None:
    """Fail (with the verdict's table) unless the run's verdict is PASS and its baseline, if any, holds."""
    __tracebackhide__ = True
    if run.error is not None:
        _fail(run, "detox-harness run could not start")
    if not run.passed:
        status = getattr(run.verdict, "status", "FAIL")
        failed = [b.name for b in getattr(run.verdict, "bounds", []) if not b.passed]
        _fail(run, f"detox-harness verdict: {status}" + (f"; failed bounds: {', '.join(failed)}" if failed else ""))


def assert_bound(run: HarnessRun, name: str) -> None:
    """Fail (with the verdict's table) unless bound ``name`` holds in the run."""
    __tracebackhide__ = True
    if run.error is not None:
        _fail(run, "detox-harness run could not start")
    bounds = {b.name: b for b in getattr(run.verdict, "bounds", [])}
    if name not in bounds:
        _fail(run, f"bound {name} was not judged in this run (bounds: {', '.join(sorted(bounds))})")
    if not bounds[name].passed:
        _fail(run, f"bound {name} failed")


class Runner:
    """Runs (or reuses, within the session) the harness for a pytest session; the fixtures' engine."""

    def __init__(self, config, report_dir: Path):
        self.config = config
        self.report_dir = report_dir
        self.done: dict[tuple, HarnessRun | Exception] = {}

    def overrides(self, seed: int, extra) -> list[str]:
        given = self.config.getoption("--detox-overrides").split()
        return location_overrides(self.config) + given + list(extra) + [f"seed={seed}"]

    def run(self, preset: str | None = None, seed: int = 0, *extra: str, config: str | None = None,
            baseline: str | None = None) -> HarnessRun:
        from .errors import HarnessError
        from .jobs.run import run
        from .plan import Request, plan_run

        preset = preset or cases(self.config)[0].preset
        config = config if config is not None else config_file(self.config)
        baseline = baseline if baseline is not None else self.config.getoption("--baseline")
        overrides = tuple(self.overrides(seed, extra))
        key = ("run", preset, seed, config, overrides, baseline)
        if key not in self.done:
            run_dir = self.report_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-pytest-{preset}-s{seed}-{len(self.done)}"
            t = time.time()
            try:
                plan = plan_run(Request(preset, config, overrides), output=run_dir, baseline=baseline,
                                cache=not self.config.getoption("--detox-no-cache"), echo=_quiet)
                outcome = run(plan, progress=False, echo=_quiet)
                self.done[key] = HarnessRun(run_dir, outcome.exit_code, outcome.results, outcome.verdict,
                                            outcome.report, outcome.baseline_checks, time.time() - t)
            except HarnessError as e:
                self.done[key] = HarnessRun(run_dir, e.exit_code, seconds=time.time() - t, error=str(e))
            except Exception as e:  # a bug: every test of this run sees it, none runs it again
                self.done[key] = e
        return self._result(key)

    def _result(self, key: tuple) -> HarnessRun:
        found = self.done[key]
        if isinstance(found, BaseException):
            raise found
        return found

    def evaluate(self, adapter: str | Path | None = None, preset: str | None = None, seed: int = 0, *extra: str,
                 config: str | None = None) -> HarnessRun:
        from .errors import HarnessError
        from .jobs.evaluate import evaluate
        from .plan import Request, plan_eval
        from .results import load_results

        preset = preset or cases(self.config)[0].preset
        config = config if config is not None else config_file(self.config)
        overrides = tuple(self.overrides(seed, extra))
        key = ("eval", preset, seed, config, overrides, None if adapter is None else str(adapter))
        if key not in self.done:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            run_dir = self.report_dir / f"{stamp}-pytest-eval-{preset}-s{seed}-{len(self.done)}"
            t = time.time()
            try:
                run_dir, page = evaluate(plan_eval(Request(preset, config, overrides), adapter, run_dir, echo=_quiet),
                                         progress=False)
                self.done[key] = HarnessRun(run_dir, 0, load_results(run_dir), None, page, seconds=time.time() - t)
            except HarnessError as e:
                self.done[key] = HarnessRun(run_dir, e.exit_code, seconds=time.time() - t, error=str(e))
            except Exception as e:
                self.done[key] = e
        return self._result(key)


def _quiet(*args, **kwargs) -> None:
    """The fixtures' echo: a suite's output is its tests' (warnings are in each run's run.log)."""


@pytest.fixture(scope="session")
def detox_report_dir(pytestconfig, tmp_path_factory) -> Path:
    """``--report-dir``, else a temporary directory: test runs never enter the history of a user's reports/."""
    given = pytestconfig.getoption("--report-dir")
    d = Path(given) if given else tmp_path_factory.mktemp("detox-runs")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def detox_runner(pytestconfig, detox_report_dir) -> Runner:
    return Runner(pytestconfig, detox_report_dir)


@pytest.fixture(scope="session")
def detox_run(detox_runner):
    """``detox_run(preset=None, seed=0, *overrides, config=None, baseline=None) -> HarnessRun``: a harness run with
    the session's options, made once per pytest session for each distinct request and reused after."""
    return detox_runner.run


@pytest.fixture(scope="session")
def detox_eval(detox_runner):
    """``detox_eval(adapter=None, preset=None, seed=0, *overrides) -> HarnessRun``: an evaluation-only run of an
    adapter or checkpoint directory (None: the base model), once per session for each distinct request."""
    return detox_runner.evaluate
