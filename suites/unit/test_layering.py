"""The package reads top-down: every module imports only modules below it (docs/architecture.md).

The test parses every module of ``harness/`` (imports inside functions included: a lazy import is still a
dependency) and checks each import of a harness module against :data:`LAYERS`, lowest first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "harness"

#: lowest first; a module may import modules of a lower layer only (never its own layer, never a higher one)
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("files",),  # the one atomic writer, and the directory lock
    ("thresholds",),  # the bounds table: reads TOML, judges a results dict
    ("config",),
    ("parallel",),  # the processes of a data-parallel run (accelerate); the identity with one process
    ("attention",),  # transformers' sdpa with T5's bias-and-mask built once per forward pass
    ("metrics",),  # pure statistics, no torch
    ("results",),  # run files: names, schema, build, write, read
    ("provenance",),  # models' revisions, the prompts' fingerprint, the run files' manifest and its check
    ("evalcache",),  # the cached "before" evaluation, keyed by all it depends on
    ("rundir",),  # what a run directory may hold before a command writes; what --resume may change
    ("baselines",),  # metrics of honest seeds as a data file; a run compared with it
    ("calibration",),  # each bound's limit proposed from the honest seeds, checked against planted runs
    ("sft",),  # the one supervised (prompt -> summary) training loop: the warm start and the tiny policy
    ("tiny",),
    ("models",),
    ("judges",),  # labels and judges checked from config.json files, before any model loads
    ("data",),
    ("toxicity",),
    ("faithfulness",),  # the NLI judge of summaries against their dialogues (reuses toxicity's loading)
    ("ppo.core",),
    ("ppo.sampling",),  # counter-based per-row noise: the rollout's sampler, on the device
    ("ppo.batch",),  # padding, the action mask, the rollout's record: what rollout, step and evaluation share
    ("ppo.rollout", "ppo.step"),  # the batched decode loop; one PPO update
    ("ppo.checkpoints",),  # the trainer's checkpoints on disk
    ("evaluation", "ppo.trainer"),
    ("ppo",),
    ("curve",),  # the over-optimisation curve: the policy evaluated every few steps, the selected point
    ("report.formats",),  # the one vocabulary of figures (HTML and terminal)
    ("report.plots",),
    ("report.render",),
    ("report.text", "report.demo"),  # the terminal's text of a run
    ("report",),
    ("trackers",),  # a finished run exported to TensorBoard / MLflow (output.report_to)
    ("plan",),  # everything a command decides, before any model loads; the only place tiny:// becomes a path
    ("jobs.inputs", "jobs.warm_start"),
    ("jobs.run", "jobs.evaluate", "jobs.curve"),
    ("jobs.baseline",),
    ("jobs",),
    ("starter",),  # detox-harness init: a team's starter project (config, suite, CI snippet)
    ("cli",),
    ("pytest_plugin",),  # the pytest11 plugin: options, run fixtures, verdict assertions
    ("__init__",),
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def harness_imports(path: Path) -> set[str]:
    """The harness modules ``path`` imports, as names like ``ppo.step`` (``from . import x`` resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = module_name(path)
    package = own.split(".")[:-1] if path.name != "__init__.py" else own.split(".")
    if own == "__init__":
        package = []
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("harness."):
                    found.add(alias.name.removeprefix("harness."))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("harness"):
                    base = node.module.removeprefix("harness").lstrip(".")
                else:
                    continue
            else:
                up = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                base = ".".join([*up, *(node.module.split(".") if node.module else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if candidate in RANK else base)
    found.discard("")
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "templates" not in p.parts)


def test_every_module_has_a_layer():
    missing = sorted({module_name(p) for p in MODULES} - set(RANK))
    assert not missing, f"add these modules to LAYERS (and docs/architecture.md): {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_imports_one_above_it(path):
    own = module_name(path)
    upward = sorted(m for m in harness_imports(path) if m in RANK and m != own and RANK[m] >= RANK[own])
    assert not upward, f"harness.{own} (layer {RANK[own]}) imports {upward} from its own layer or above"


def test_the_walker_sees_lazy_and_relative_imports(tmp_path):
    """The check itself: an upward import inside a function is found."""
    probe = PACKAGE / "metrics.py"
    found = harness_imports(probe)
    assert "config" in found and "errors" in found
    assert "plan" not in found
    fake = tmp_path / "harness" / "ppo"
    fake.mkdir(parents=True)
    code = "def f():\n    from ..plan import plan_run\n    from . import core\n"
    (fake / "step.py").write_text(code)
    original = globals()["PACKAGE"]
    try:
        globals()["PACKAGE"] = tmp_path / "harness"
        assert harness_imports(fake / "step.py") == {"plan", "ppo.core"}
    finally:
        globals()["PACKAGE"] = original


def test_only_the_plan_turns_a_tiny_world_id_into_a_path():
    """A ``tiny://`` id becomes a directory in harness.plan alone (models and data refuse one that reaches them):
    no other module calls the tiny world's resolve."""
    callers = set()
    for path in MODULES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            imported = isinstance(node, ast.ImportFrom) and (node.module or "").endswith("tiny") and \
                any(a.name == "resolve" for a in node.names)
            called = isinstance(node, ast.Attribute) and node.attr == "resolve" and \
                isinstance(node.value, ast.Name) and node.value.id == "tiny"
            if imported or called:
                callers.add(module_name(path))
    assert callers == {"plan"}, callers


def test_no_test_module_imports_another():
    """Shared fixtures live in a conftest.py and shared helpers in a module of ``suites/`` (``report_dom``,
    ``oracles``, ``weights``), never in a test module that another one imports: a test file can then be moved,
    split or deselected on its own (issue 23)."""
    suites = PACKAGE.parent / "suites"
    found = []
    for path in sorted(suites.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(suites)}: {n}" for n in names if n.split(".")[-1].startswith("test_")]
    assert found == []
