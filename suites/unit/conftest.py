"""Fixtures for the fast unit suite: small artifacts built in-process in well under a second."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.config import REFERENCE_PROMPT
from harness.tiny import make_corpus, train_t5_tokenizer

UNIT_ROWS = {"train": 240, "validation": 40, "test": 40}


@pytest.fixture(scope="session")
def corpus():
    """A small synthetic DialogSum-format corpus (same generator as the tiny world)."""
    return make_corpus(seed=0, rows=UNIT_ROWS)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, corpus) -> Path:
    d = tmp_path_factory.mktemp("dialogues")
    for split, rows in corpus.items():
        with open(d / f"{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return d


@pytest.fixture(scope="session")
def t5_tokenizer(corpus):
    texts = [REFERENCE_PROMPT.format(dialogue=r["dialogue"]) for r in corpus["train"]]
    texts += [r["summary"] for r in corpus["train"]]
    return train_t5_tokenizer(texts)
