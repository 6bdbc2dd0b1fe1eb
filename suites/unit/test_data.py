"""The DialogSum pipeline: loading, column layouts, filtering, prompting, tokenizing, splitting."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from harness.config import REFERENCE_PROMPT, DataConfig
from harness.data import build_prompts, filter_by_length, load_rows, normalize
from harness.errors import DataError

DIALOGSUM_DIR = os.environ.get("DIALOGSUM_DIR")
needs_dialogsum = pytest.mark.skipif(not DIALOGSUM_DIR, reason="DIALOGSUM_DIR is not set (point it at "
                                                                "../shared/data/dialogsum)")
# Facts about the real files, from ../shared/data/dialogsum/SOURCE.md
DEV_ROWS, DEV_KEPT, TEST_ROWS, TEST_KEPT = 500, 404, 500, 384


def expected_kept(rows, cfg):
    return [r for r in rows if cfg.min_chars < len(r["dialogue"]) < cfg.max_chars]


def test_filter_bounds_are_exclusive():
    rows = [{"dialogue": "x" * n} for n in (200, 201, 999, 1000)]
    assert [len(r["dialogue"]) for r in filter_by_length(rows, 200, 1000)] == [201, 999]


def test_synthetic_pipeline_filters_wraps_tokenizes_and_splits(corpus, corpus_dir, t5_tokenizer):
    cfg = DataConfig(path=str(corpus_dir), split="train", max_prompt_tokens=10_000)
    data = build_prompts(cfg, t5_tokenizer)
    kept = expected_kept(corpus["train"], cfg)
    assert 0 < len(kept) < len(corpus["train"])  # the filter removes something and keeps something
    assert data.stats["kept"] == len(kept)
    assert data.stats["removed_by_length"] == len(corpus["train"]) - len(kept)
    assert len(data.train) + len(data.test) == len(kept)
    assert len(data.test) == math.ceil(len(kept) * cfg.test_fraction)  # datasets rounds up: 10,022 -> 2,005
    # no shuffling: train is the head, test the tail, in file order
    assert list(data.train["id"]) == [r["id"] for r in kept[: len(data.train)]]
    assert list(data.test["id"]) == [r["id"] for r in kept[len(data.train):]]
    row = data.train[0]
    assert row["prompt"] == REFERENCE_PROMPT.format(dialogue=kept[0]["dialogue"])
    assert row["summaries"] == [kept[0]["summary"]]
    assert row["input_ids"][-1] == t5_tokenizer.eos_token_id
    assert data.stats["truncated_prompts"] == 0


def test_tokenization_round_trip(corpus_dir, t5_tokenizer):
    data = build_prompts(DataConfig(path=str(corpus_dir), max_prompt_tokens=10_000), t5_tokenizer)
    for row in data.train.select(range(20)):
        assert row["query"] == t5_tokenizer.decode(row["input_ids"], skip_special_tokens=True)
        # T5's normalizer folds newlines into spaces; words and order survive the round trip
        assert row["query"].split() == row["prompt"].split()
        assert t5_tokenizer(row["query"]).input_ids == row["input_ids"]


def test_long_prompts_are_truncated_and_counted(corpus_dir, t5_tokenizer):
    limit = 64
    data = build_prompts(DataConfig(path=str(corpus_dir), max_prompt_tokens=limit), t5_tokenizer)
    full = [len(t5_tokenizer(p).input_ids) for p in list(data.train["prompt"]) + list(data.test["prompt"])]
    assert data.stats["truncated_prompts"] == sum(n > limit for n in full) > 0
    assert max(len(x) for x in data.train["input_ids"]) == limit
    assert all(ids[-1] == t5_tokenizer.eos_token_id for ids in data.train["input_ids"])


def test_custom_template(corpus_dir, t5_tokenizer):
    cfg = DataConfig(path=str(corpus_dir), prompt_template="Dialogue: {dialogue} TL;DR:", max_prompt_tokens=10_000)
    data = build_prompts(cfg, t5_tokenizer)
    assert data.train[0]["prompt"].startswith("Dialogue: #Person1#") and data.train[0]["prompt"].endswith("TL;DR:")


def test_single_file_csv_and_original_columns(tmp_path, corpus, t5_tokenizer):
    import csv

    rows = corpus["test"]
    path = tmp_path / "orig.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["fname", "dialogue", "summary1", "summary2", "summary3", "topic1"])
        w.writeheader()
        for r in rows:
            w.writerow({"fname": r["id"], "dialogue": r["dialogue"], "summary1": r["summary"],
                        "summary2": r["summary"].upper(), "summary3": "third", "topic1": r["topic"]})
    normalized = normalize(load_rows(str(path)))
    assert len(normalized) == len(rows)
    assert normalized[0]["summaries"] == [rows[0]["summary"], rows[0]["summary"].upper(), "third"]
    assert normalized[0]["id"] == rows[0]["id"] and normalized[0]["topic"] == rows[0]["topic"]


def test_repeated_dialogues_are_merged_keeping_every_reference(tmp_path):
    path = tmp_path / "test.jsonl"
    d = "#Person1#: " + "hello there " * 30
    with open(path, "w") as f:
        for i, s in enumerate(["a", "b", "c"]):
            f.write(json.dumps({"id": f"test_0_{i}", "dialogue": d, "summary": s, "topic": "t"}) + "\n")
    rows = normalize(load_rows(str(path)))
    assert len(rows) == 1 and rows[0]["summaries"] == ["a", "b", "c"]


def test_directory_split_lookup(tmp_path, corpus):
    for name in ("dialogsum.dev.jsonl", "dialogsum.test.jsonl"):
        with open(tmp_path / name, "w") as f:
            for r in corpus["validation"]:
                f.write(json.dumps(r) + "\n")
    assert len(load_rows(str(tmp_path), "validation")) == len(corpus["validation"])  # validation -> dev
    with pytest.raises(DataError) as e:
        load_rows(str(tmp_path), "train")
    assert e.value.field == "data.split" and "dialogsum.dev.jsonl" in str(e.value)


@needs_dialogsum
def test_real_dialogsum_dev_split_counts(t5_tokenizer):
    raw = load_rows(DIALOGSUM_DIR, "dev")
    assert len(raw) == DEV_ROWS
    data = build_prompts(DataConfig(path=DIALOGSUM_DIR, split="dev"), t5_tokenizer)
    assert data.stats["kept"] == DEV_KEPT
    assert (len(data.train), len(data.test)) == (DEV_KEPT - round(DEV_KEPT * 0.2), round(DEV_KEPT * 0.2))


@needs_dialogsum
def test_real_dialogsum_test_split_keeps_three_references():
    rows = normalize(load_rows(DIALOGSUM_DIR, "test"))
    assert len(rows) == TEST_ROWS
    assert all(len(r["summaries"]) == 3 for r in rows)
    cfg = DataConfig()
    assert len(expected_kept(rows, cfg)) == TEST_KEPT
    raw = [json.loads(line) for line in Path(DIALOGSUM_DIR, "dialogsum.test.jsonl").read_text().splitlines()]
    assert rows[7]["summaries"] == [raw[7]["summary1"], raw[7]["summary2"], raw[7]["summary3"]]
