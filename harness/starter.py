"""``detox-harness init DIR``: a team's starter project, judged by the pytest plugin (harness.pytest_plugin).

It writes (never over an existing file: the whole starter is refused first, nothing half-written):

- ``detox.yaml``: the settings applied on top of the preset, with the model and data keys to point at the
  team's own (commented out: as written, the preset's own models and data are used);
- ``suites/test_detox.py``: one test per preset and seed (the plugin's ``detox_case``) asserting the verdict,
  and one per bound, whose failure message is the verdict's table;
- ``pytest.ini``: the presets, seeds and settings file the plugin reads (``detox_presets``, ``detox_seeds``,
  ``detox_config``), the suite's folder and its markers;
- ``ci/detox-nightly.yml``: a GitHub Actions workflow that runs the suite nightly on a GPU runner.
"""

from __future__ import annotations

from pathlib import Path

from .errors import HarnessError
from .files import atomic_write_text

CONFIG = """\
# detox-harness settings for this project's suite, applied on top of the preset (list them: detox-harness presets).
# Point the models and data at your own: a hub id or a local directory (a local directory is pinned by the SHA-256
# of its weight and config files in each run's results.json; a hub model by its snapshot's commit).
#
# policy:
#   model: google/flan-t5-base          # your base model
#   adapter: path/to/your/lora          # your starting LoRA adapter (optional)
# reward:
#   model: facebook/roberta-hate-speech-dynabench-r4-target
# eval:
#   second_classifier: unitary/toxic-bert
#   faithfulness_model: FacebookAI/roberta-large-mnli
# data:
#   path: knkarthick/dialogsum          # or a local .jsonl / directory in DialogSum's format
#
# Export each run to your experiment trackers (pip install 'detox-harness[trackers]'):
# output:
#   report_to: [tensorboard, mlflow]
{settings}"""

SUITE = '''\
"""The detoxification gate of this project: one harness run per preset and seed, judged by the preset's bounds.

Run it with ``pytest`` (the presets, seeds and settings are in pytest.ini; override them with
``--detox-presets``, ``--detox-seeds``, ``--detox-config``, or point at other models with ``--policy-model``,
``--reward-model``, ...: ``pytest --help`` lists them under "detox-harness"). Each run happens once per pytest
session and is shared by the tests below. A failing test prints the verdict's table (bound, limit, measured).
"""

import pytest

from harness.pytest_plugin import assert_bound, assert_passed


def test_verdict(detox_case, detox_run):
    """The run's verdict is PASS: every bound holds, on enough evidence."""
    run = detox_run(detox_case.preset, detox_case.seed)
    assert_passed(run)


@pytest.mark.parametrize("bound", ["min_improvement", "max_kl"])
def test_bound(detox_case, detox_run, bound):
    """One bound at a time, so that the test report names the one that failed."""
    run = detox_run(detox_case.preset, detox_case.seed)
    assert_bound(run, bound)
'''

INI = """\
[pytest]
testpaths = suites
# the detox-harness plugin (harness.pytest_plugin): the runs the detox_case tests make
detox_presets = {presets}
detox_seeds = {seeds}
detox_config = detox.yaml
markers =
    gpu: needs a CUDA device and real models; runs only with --run-gpu
# peft asks transformers a deprecated question; nothing for the suite to act on
filterwarnings =
    ignore:`is_gradient_checkpointing` is deprecated:FutureWarning
"""

CI = """\
# A nightly detoxification gate (GitHub Actions). Copy to .github/workflows/detox-nightly.yml.
# Exit codes of the suite: pytest's (a failed bound fails its test and prints the verdict's table).
name: detox nightly
on:
  schedule:
    - cron: "17 3 * * *"
  workflow_dispatch:
jobs:
  detox:
    runs-on: [self-hosted, gpu]   # a runner with an NVIDIA GPU; the tiny preset also runs on ubuntu-latest
    timeout-minutes: 240
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with:
          python-version: "3.11"
      - run: pip install "detox-harness[trackers]" pytest
      # --run-gpu: tests marked gpu run (and fail loudly where there is no CUDA device)
      - run: pytest --detox-presets {presets} --detox-seeds {seeds} --report-dir reports/nightly -ra
      - uses: actions/upload-artifact@v4
        if: always()
        with:
          name: detox-reports
          path: reports/nightly
"""

FILES = ("detox.yaml", "suites/test_detox.py", "pytest.ini", "ci/detox-nightly.yml")


def starter_files(presets: list[str], seeds: list[int], settings: str = "") -> dict[str, str]:
    """The starter's files, by path relative to the project's directory."""
    listed_presets, listed_seeds = ",".join(presets), ",".join(str(s) for s in seeds)
    return {"detox.yaml": CONFIG.format(settings=settings),
            "suites/test_detox.py": SUITE,
            "pytest.ini": INI.format(presets=listed_presets, seeds=listed_seeds),
            "ci/detox-nightly.yml": CI.format(presets=listed_presets, seeds=listed_seeds)}


def write_starter(directory: str | Path, presets: list[str], seeds: list[int], settings: str = "") -> list[Path]:
    """Write the starter into ``directory`` (made if needed); returns the files written. An existing file of the
    starter is refused before anything is written."""
    from .config import preset_names

    known = preset_names()
    for preset in presets:
        if preset not in known:
            raise HarnessError("unknown preset", field="--presets", value=preset, fix=f"use one of {', '.join(known)}")
    if not presets or not seeds:
        raise HarnessError("needs at least one preset and one seed", field="--presets/--seeds",
                           fix="for example --presets tiny --seeds 0")
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise HarnessError("is a file, not a directory", field="DIR", value=str(directory),
                           fix="give a new or existing project directory")
    files = starter_files(presets, seeds, settings)
    present = [name for name in files if (directory / name).exists()]
    if present:
        raise HarnessError(f"would overwrite {', '.join(present)}", field="DIR", value=str(directory),
                           fix="move those files away, or init another directory")
    written = []
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        written.append(path)
    return written
