"""Root pytest configuration: the detox-harness plugin, and hermetic defaults for this repository's suites.

Every option (``--run-gpu``, ``--baseline``, ``--report-dir``, the models and data, the GPU suite's) and the
``gpu`` gating come from the plugin, :mod:`harness.pytest_plugin`, the same one a team's own repository uses
(docs/pytest-plugin.md). It is listed here by its module name, which is also its ``pytest11`` entry point's
name: with the package installed, pytest registers it once under that name and this line finds it there.
Tests marked ``gpu`` are skipped unless ``--run-gpu`` is given; with ``--run-gpu`` on a machine without CUDA
they *fail* with a clear message, so a nightly GPU job can never pass by silently skipping everything.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester", "harness.pytest_plugin"]

#: the rows of the small synthetic corpus the unit and fuzzing tests share
UNIT_ROWS = {"train": 240, "validation": 40, "test": 40}


@pytest.fixture(scope="session")
def corpus():
    """A small synthetic DialogSum-format corpus (same generator as the tiny world), built in-process."""
    from harness.tiny import make_corpus

    return make_corpus(seed=0, rows=UNIT_ROWS)


@pytest.fixture(scope="session")
def t5_tokenizer(corpus):
    """A T5 tokenizer trained on that corpus's prompts and summaries."""
    from harness.config import REFERENCE_PROMPT
    from harness.tiny import train_t5_tokenizer

    texts = [REFERENCE_PROMPT.format(dialogue=r["dialogue"]) for r in corpus["train"]]
    texts += [r["summary"] for r in corpus["train"]]
    return train_t5_tokenizer(texts)


def pytest_configure(config):
    if not config.getoption("--run-gpu"):
        # Unit and integration suites never touch the network: a hub lookup fails at once.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
